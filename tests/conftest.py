import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and pytest imports every test
# module in one process: without a GPU, the triton kernels are tested on CPU tensors
# under the interpreter (see tests/test_ops_triton.py), so set it before anything imports
# triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
