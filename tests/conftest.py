import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and pytest imports every test
# module in one process: without a GPU, the triton kernels are tested on CPU tensors
# under the interpreter (see tests/test_ops_triton.py), so set it before anything imports
# triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def demo_dir(tmp_path_factory, monkeypatch):
    """Point the built-in demo data at one folder under pytest's base temp, shared by the session."""
    monkeypatch.setenv("CMN_DEMO_DIR", str(tmp_path_factory.getbasetemp() / "demo"))
