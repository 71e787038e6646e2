"""cmn: Cross-modal Memory Networks for radiology report generation."""

from cmn.errors import CheckpointError, CMNError, ConfigError, DataError

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("cmn")  # one source: Cargo.toml's version, through maturin
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0+unknown"


def load_checkpoint(path, device=None):
    """Load a checkpoint bundle (``cmn-train``, ``cmn-convert``) as a :class:`cmn.checkpoint.Bundle`:
    ``.model``, ``.tokenizer``, ``.data``, ``.meta``; see :func:`cmn.checkpoint.load_checkpoint`."""
    from cmn.checkpoint import load_checkpoint as _load

    return _load(path, device=device)


__all__ = ["CMNError", "CheckpointError", "ConfigError", "DataError", "__version__", "load_checkpoint"]
