# The two commands of the README, and a few helpers.
PY ?= python3

.PHONY: demo test install browser rust-check lint bench bench-gpu

install:
	$(PY) -m pip install -e ".[test]"

# Set up and train on the built-in demo data (about 9.5 minutes on 2 CPU cores, measured; see README).
demo:
	$(PY) -m pip install . && cmn-train

rust-check:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	cargo test --quiet

# Python checks: lint and format (ruff), types (mypy), the native stub against the built module (stubtest).
lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m mypy.stubtest cmn._native --allowlist python/cmn/_native.stubtest-allowlist

# The headless browser the page tests open (Debian's Chromium and its driver), when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else \
			echo "page tests need: sudo apt-get install -y chromium chromium-driver"; \
		fi; \
	fi

# Everything CI runs: install, Rust checks, the test suite, and each benchmark once (smoke).
test: install browser rust-check lint
	$(PY) -m pytest tests benches --benchmark-disable --durations=15

# Full CPU benchmarks (timed); see benches/RESULTS.md.
bench:
	$(PY) -m pytest benches --benchmark-enable --benchmark-group-by=group

# One command for a lent GPU: the whole memory-query grid, written to benches/RESULTS-gpu.md.
bench-gpu:
	$(PY) benches/run_gpu_suite.py --output benches/RESULTS-gpu.md
