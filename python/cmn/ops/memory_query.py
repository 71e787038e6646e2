"""Public memory-querying op: validation, layout and dispatch to an implementation.

Implementations:

* ``naive``: :func:`cmn.ops.memory_query_ref`, the reference code's ops (the spec).
* ``torch``: :mod:`cmn.ops._torch`, the same maths without the (B, H, L, N, d) gather;
  bounded scratch memory, deterministic on CPU.
* ``cpu``: :mod:`cmn.ops._cpu`, fused Rust kernels for CPU tensors in fp32 or fp64:
  scores in cache-sized tiles + running top-K + softmax + weighted sum, and a backward
  that scatters dK/dV into the selected rows only; deterministic, ties to the lowest index.
* ``triton``: :mod:`cmn.ops._triton`, one fused kernel for scores + running top-K +
  softmax + weighted sum, and one for the backward (CUDA, or CPU under
  ``TRITON_INTERPRET=1``).
* ``auto``: ``triton`` for CUDA tensors when triton is importable; ``cpu`` for CPU
  tensors in fp32 or fp64; ``torch`` otherwise (bf16/fp16 on CPU, other devices).
"""

import os
import warnings

import torch

from cmn.errors import ConfigError
from cmn.ops import _cpu, _torch
from cmn.ops._ref import memory_query_ref

IMPLS = ("auto", "naive", "torch", "cpu", "triton")
TRITON_MAX_TOPK = 128
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float64)


def _triton_available(device):
    """Whether the triton path can run on ``device``; the reason when it cannot."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    if device.type not in ("cpu", "cuda"):
        return f"no triton kernels for device {device.type!r}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def _cpu_unavailable(device, dtype):
    """Why the fused CPU kernels cannot run these tensors, or None."""
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    if dtype not in CPU_DTYPES:
        return f"it supports fp32 and fp64, not {dtype}"
    if not _cpu.kernels_built():
        return "the compiled extension cmn._native predates it (rebuild the package)"
    return None


def _triton_supports_topk(topk):
    return topk <= TRITON_MAX_TOPK and topk & (topk - 1) == 0


def resolve_impl(impl, device, topk, dtype=torch.float32):
    """The implementation that ``memory_query`` will run for ``impl``, ``device``, ``topk``, ``dtype``."""
    if impl not in IMPLS:
        raise ConfigError(f"memory_query impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        if (
            device.type == "cuda"
            and dtype in TRITON_DTYPES
            and _triton_supports_topk(topk)
            and _triton_available(device) is None
        ):
            return "triton"
        return "cpu" if _cpu_unavailable(device, dtype) is None else "torch"
    if impl == "cpu":
        reason = _cpu_unavailable(device, dtype)
        if reason is not None:
            raise ConfigError(f"memory_query impl='cpu' cannot run: {reason}; use impl='torch' or 'auto'")
    if impl == "triton":
        reason = _triton_available(device)
        if reason is not None:
            raise ConfigError(f"memory_query impl='triton' cannot run: {reason}; use impl='torch' or 'auto'")
        if dtype not in TRITON_DTYPES:
            raise ConfigError(f"memory_query impl='triton' supports fp32, bf16 and fp16; got {dtype}")
        if not _triton_supports_topk(topk):
            warnings.warn(
                f"memory_query: the triton kernel needs topk a power of two <= {TRITON_MAX_TOPK}; "
                f"topk={topk} runs on the torch path",
                stacklevel=3,
            )
            return "torch"
    return impl


def _check_inputs(q, k, v, topk, dropout_p):
    if q.dim() != 4:
        raise ConfigError(f"memory_query: q must be (B, H, L, d); got shape {tuple(q.shape)}")
    B, H, _L, d = q.shape
    if k.shape != v.shape or k.dim() not in (3, 4):
        raise ConfigError(
            f"memory_query: k and v must both be (H, N, d) or (B, H, N, d); got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    want = (H, k.size(-2), d) if k.dim() == 3 else (B, H, k.size(-2), d)
    if tuple(k.shape) != want:
        raise ConfigError(
            f"memory_query: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} (expected {want})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ConfigError(f"memory_query: q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ConfigError(f"memory_query: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    N = k.size(-2)
    if not isinstance(topk, int) or not 1 <= topk <= N:
        raise ConfigError(f"memory_query: topk must be an int in [1, N={N}]; got {topk!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"memory_query: dropout_p must be in [0, 1); got {dropout_p}")


def _dropout_mask(q, topk, dropout_p):
    """(B, H, L, K) inverted-dropout multipliers, drawn like F.dropout draws them on CPU."""
    B, H, L, _ = q.shape
    keep = 1.0 - dropout_p
    return q.new_empty(B, H, L, topk).bernoulli_(keep).div_(keep)


def _to_groups(q, k, v):
    """(B, H, L, d) + (H|B*H, N, d) -> grouped (G, R, d) queries and (G, N, d) memory."""
    B, H, L, d = q.shape
    if k.dim() == 3:  # shared memory: one group per head, all B*L rows query it
        return q.transpose(0, 1).reshape(H, B * L, d), k, v
    return q.reshape(B * H, L, d), k.reshape(B * H, -1, d), v.reshape(B * H, -1, d)


def _from_groups(x, q_shape, shared):
    """Inverse of _to_groups for a (G, R, c) result -> (B, H, L, c)."""
    B, H, L, _ = q_shape
    if shared:
        return x.view(H, B, L, -1).transpose(0, 1)
    return x.view(B, H, L, -1)


def memory_query(q, k, v, topk, *, impl="auto", return_selection=False, dropout_p=0.0):
    """Read the top-K memory slots of each query row.

    Shapes (B batch, H heads, L query rows, N memory slots, d head size, K = topk):
        q: (B, H, L, d); k, v: (H, N, d) shared by the batch, or (B, H, N, d).
        q, k, v share one floating dtype (fp32, bf16, fp16; fp64 on the naive and torch
        paths) and one device.

    Computes scores = q k^T / sqrt(d), keeps the K largest per row, softmax over those
    K, multiplies the weights by an inverted-dropout mask when ``dropout_p > 0`` (pass 0
    in eval mode: the op has no training flag, like ``F.scaled_dot_product_attention``),
    and returns the weighted sum of the K selected value rows.

    Args:
        impl: "auto" | "naive" | "torch" | "cpu" | "triton" (see the module docstring). "triton"
            with a topk that is not a power of two <= 128 warns once and runs "torch".
        return_selection: also return the indices and weights.
        dropout_p: dropout probability on the softmax weights.

    Returns:
        out (B, H, L, d) in q's dtype; with ``return_selection`` also idx (B, H, L, K)
        int64 (sorted by descending score; ties may resolve to any of the tied slots on
        the naive and torch paths, to the lowest index on the cpu and triton paths) and weights
        (B, H, L, K) in q's dtype, after dropout (differentiable on the naive, torch and
        cpu paths; on the triton path only ``out`` carries gradients).
    """
    _check_inputs(q, k, v, topk, dropout_p)
    impl = resolve_impl(impl, q.device, topk, q.dtype)
    if impl == "naive":
        out, idx, weights = memory_query_ref(q, k, v, topk, dropout_p)
    else:
        mask = _dropout_mask(q, topk, dropout_p) if dropout_p > 0 else None
        shared = k.dim() == 3
        qg, kg, vg = _to_groups(q, k, v)
        maskg = None if mask is None else _to_groups(mask, k, v)[0]
        if impl == "torch":
            out, idx, weights = _torch.memory_query_torch(qg, kg, vg, topk, maskg)
        elif impl == "cpu":
            out, idx, weights = _cpu.memory_query_cpu(qg, kg, vg, topk, maskg)
        else:
            from cmn.ops import _triton

            out, idx, weights = _triton.memory_query_triton(qg, kg, vg, topk, maskg)
        out, idx, weights = (_from_groups(t, q.shape, shared) for t in (out, idx, weights))
    if return_selection:
        return out, idx, weights
    return out
