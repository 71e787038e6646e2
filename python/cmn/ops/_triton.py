"""Fused memory querying in Triton: kernels, launchers, autograd.Function.

Layout follows Triton's fused-attention tutorial: kernels first, then launchers, then the
autograd.Function. Everything works on the grouped layout of ``memory_query._to_groups``:
G groups of R query rows, each group reading its own (N, d) keys and values.

Forward, one program per (group, BLOCK_M query rows):
  for each BLOCK_N tile of keys: s = q k^T (fp32 accumulation; ``input_precision="ieee"``
  for fp32 inputs, so the selection matches fp32 torch), pack each score with its index
  into one int64 (order-preserving bits of the fp32 score in the high word, the
  complemented index in the low word), and merge the tile's top K into the running top K
  with ``tl.topk``. Packing makes ties deterministic: among equal scores the lowest index
  wins. Then softmax over the K winners (the 1/sqrt(d) applied to the winners only, since
  scaling is monotone), and out = sum_j w_j v[idx_j], reading K value rows per query row.
  The naive path reads all N rows *and* writes a (B, H, L, N, d) gather in backward; this
  reads each key once per row block and never materializes more than (BLOCK_M, BLOCK_N).

Backward, one program per (group, BLOCK_M rows), from the saved indices and weights:
  dp_j = dout . v[idx_j], ds = softmax backward, dq = sum_j ds_j k[idx_j]; dK and dV are
  scattered into the N memory rows with fp32 ``atomic_add``: a memory row is read by many
  query rows in many programs, and atomics keep the backward one pass with no (M*K, d)
  buffer. Atomics make the fp32 summation order (and so the last bits of dK, dV) vary
  from run to run; under ``torch.use_deterministic_algorithms(True)`` the kernel only
  writes ds and the scatter runs as torch ``index_add_``, which is deterministic there.

Dropout: the mask (0 or 1/(1-p)) is drawn by torch before the launch, so torch's RNG
decides it, and the kernels multiply the weights by it.

Triton is imported by this module only, and this module only on demand.
"""

import math

import torch
import triton
import triton.language as tl

_INT64_MIN = tl.constexpr(-(2**63))  # compiled kernels may only read constexpr globals


@triton.jit
def _pack(s, offs_n):
    """fp32 scores (BLOCK_M, BLOCK_N) + indices (BLOCK_N,) -> int64 keys sorting like (score, -index)."""
    bits = s.to(tl.int32, bitcast=True)
    # negative floats sort backwards as signed ints: flip their magnitude bits
    key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    low = (0x7FFFFFFF - offs_n).to(tl.int64)  # larger for smaller index: lowest index wins ties
    return (key32.to(tl.int64) << 32) | low[None, :]


@triton.jit
def _unpack(key):
    """int64 keys -> (fp32 score, int64 index); inverse of _pack."""
    high = key >> 32
    low = key - (high << 32)
    key32 = high.to(tl.int32)
    bits = tl.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - low


@triton.jit
def _memory_query_fwd(
    Q,
    K,
    V,
    Mask,
    Out,
    Idx,
    P,
    stride_qg,
    stride_qr,
    stride_qd,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vn,
    stride_vd,
    R,
    N,
    D,
    scale,
    TOPK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, TOPK)
    m_ok = offs_m < R
    d_ok = offs_d < D
    q = tl.load(
        Q + g * stride_qg + offs_m[:, None] * stride_qr + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)

    best = tl.full((BLOCK_M, TOPK), _INT64_MIN, tl.int64)  # running top K, packed
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(
            K + g * stride_kg + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        if IEEE:
            # fp32 products and sums; bf16/fp16 land here only under the interpreter,
            # whose bf16 tl.dot is wrong (checked with triton 3.7.1), so widen first
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, kt)
        key = tl.where(n_ok[None, :], _pack(s, offs_n), _INT64_MIN)  # masked tail never wins
        if BLOCK_N != TOPK:  # cut the tile to its top K before merging
            key = tl.topk(key, TOPK)  # (BLOCK_M, TOPK)
        best = tl.topk(tl.reshape(tl.join(best, key), (BLOCK_M, 2 * TOPK)), TOPK)

    top, idx = _unpack(best)  # (BLOCK_M, TOPK), sorted by descending score
    top = top * scale
    e = tl.exp(top - tl.max(top, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]  # (BLOCK_M, TOPK) fp32 softmax weights

    sel = g * R * TOPK + offs_m[:, None] * TOPK + offs_k[None, :]  # (G, R, K) contiguous
    tl.store(Idx + sel, idx, mask=m_ok[:, None])
    tl.store(P + sel, p, mask=m_ok[:, None])
    # read the winners back one column at a time: a register tile cannot be indexed by j,
    # and a (BLOCK_M, TOPK, BLOCK_D) gather would not fit in registers
    tl.debug_barrier()
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    rows = g * R * TOPK + offs_m * TOPK  # (BLOCK_M,)
    for j in range(TOPK):
        idx_j = tl.load(Idx + rows + j, mask=m_ok, other=0)
        w_j = tl.load(P + rows + j, mask=m_ok, other=0.0)
        if HAS_MASK:
            w_j = w_j * tl.load(Mask + rows + j, mask=m_ok, other=0.0).to(tl.float32)
        v_j = tl.load(
            V + g * stride_vg + idx_j[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        acc += w_j[:, None] * v_j.to(tl.float32)
    out_ptrs = Out + g * R * D + offs_m[:, None] * D + offs_d[None, :]  # (G, R, d) contiguous
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _memory_query_bwd(
    Q,
    K,
    V,
    Mask,
    Idx,
    P,
    DO,
    DQ,
    DK,
    DV,
    DP,
    stride_qg,
    stride_qr,
    stride_qd,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_vg,
    stride_vn,
    stride_vd,
    R,
    N,
    D,
    scale,
    TOPK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < R
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + g * stride_qg + offs_m[:, None] * stride_qr + offs_d[None, :] * stride_qd, mask=md_ok, other=0.0
    ).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + g * R * D + offs_m[:, None] * D + offs_d[None, :], mask=md_ok, other=0.0).to(
        tl.float32
    )  # (BLOCK_M, BLOCK_D), contiguous (G, R, d)
    rows = g * R * TOPK + offs_m * TOPK  # (BLOCK_M,) into the (G, R, K) selection
    mem_rows = g * N * D  # the group's first row in the contiguous fp32 (G, N, d) dK, dV

    # pass 1: dp_j = dout . v[idx_j] (through the dropout mask), dV scatter, sum_j p_j dp_j
    p_dp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(TOPK):
        idx_j = tl.load(Idx + rows + j, mask=m_ok, other=0)
        p_j = tl.load(P + rows + j, mask=m_ok, other=0.0)
        w_j = p_j
        if HAS_MASK:
            mask_j = tl.load(Mask + rows + j, mask=m_ok, other=0.0).to(tl.float32)
            w_j = p_j * mask_j
        v_j = tl.load(
            V + g * stride_vg + idx_j[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=md_ok, other=0.0
        ).to(tl.float32)
        dp_j = tl.sum(do * v_j, axis=1)  # (BLOCK_M,)
        if HAS_MASK:
            dp_j = dp_j * mask_j
        tl.store(DP + rows + j, dp_j, mask=m_ok)
        p_dp += p_j * dp_j
        if ATOMIC:
            tl.atomic_add(DV + mem_rows + idx_j[:, None] * D + offs_d[None, :], w_j[:, None] * do, mask=md_ok)
    tl.debug_barrier()

    # pass 2: ds_j = p_j (dp_j - sum p dp) / sqrt(d); dq = sum ds_j k[idx_j]; dK scatter
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j in range(TOPK):
        idx_j = tl.load(Idx + rows + j, mask=m_ok, other=0)
        p_j = tl.load(P + rows + j, mask=m_ok, other=0.0)
        ds_j = p_j * (tl.load(DP + rows + j, mask=m_ok, other=0.0) - p_dp) * scale  # (BLOCK_M,)
        k_j = tl.load(
            K + g * stride_kg + idx_j[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=md_ok, other=0.0
        ).to(tl.float32)
        dq += ds_j[:, None] * k_j
        if ATOMIC:
            tl.atomic_add(DK + mem_rows + idx_j[:, None] * D + offs_d[None, :], ds_j[:, None] * q, mask=md_ok)
        else:
            tl.store(DP + rows + j, ds_j, mask=m_ok)  # the launcher scatters ds itself
    tl.store(DQ + g * R * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_ok)


def _block_sizes(topk, d, device):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): untuned defaults keeping the packed running
    top-K state (BLOCK_M x TOPK int64) and the tile topk (BLOCK_M x BLOCK_N) small."""
    block_d = max(16, triton.next_power_of_2(d))
    if device.type == "cpu":  # the interpreter sorts element by element: smallest legal tiles
        return 16, max(16, topk), block_d, 1
    block_m = 64 if topk <= 32 else (32 if topk <= 64 else 16)
    block_n = max(64, topk)
    return block_m, block_n, block_d, 4


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _memory_query_fwd_launch(q, k, v, mask, topk):
    G, R, d = q.shape
    N = k.size(1)
    block_m, block_n, block_d, num_warps = _block_sizes(topk, d, q.device)
    out = torch.empty(G, R, d, dtype=q.dtype, device=q.device)
    idx = torch.empty(G, R, topk, dtype=torch.int64, device=q.device)
    p = torch.empty(G, R, topk, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(R, block_m), G)
    _memory_query_fwd[grid](
        q,
        k,
        v,
        mask if mask is not None else p,
        out,
        idx,
        p,
        *_strides(q, k, v),
        R,
        N,
        d,
        1.0 / math.sqrt(d),
        TOPK=topk,
        HAS_MASK=mask is not None,
        IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out, idx, p


def _memory_query_bwd_launch(q, k, v, mask, idx, p, d_out):
    G, R, d = q.shape
    N = k.size(1)
    topk = idx.size(-1)
    block_m, _, block_d, num_warps = _block_sizes(topk, d, q.device)
    atomic = not torch.are_deterministic_algorithms_enabled()
    d_out = d_out.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros(G, N, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(G, N, d, dtype=torch.float32, device=q.device)
    scratch = torch.empty(G, R, topk, dtype=torch.float32, device=q.device)  # dp, then ds
    grid = (triton.cdiv(R, block_m), G)
    _memory_query_bwd[grid](
        q,
        k,
        v,
        mask if mask is not None else p,
        idx,
        p,
        d_out,
        dq,
        dk,
        dv,
        scratch,
        *_strides(q, k, v),
        R,
        N,
        d,
        1.0 / math.sqrt(d),
        TOPK=topk,
        HAS_MASK=mask is not None,
        ATOMIC=atomic,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if not atomic:
        _scatter_rows(dk, idx, scratch, q)
        _scatter_rows(dv, idx, p if mask is None else p * mask, d_out)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _scatter_rows(dst, idx, weights, rows, chunk=4096):
    """dst[g, idx[g, r, j]] += weights[g, r, j] * rows[g, r] with deterministic index_add_."""
    G, N, d = dst.shape
    R = idx.size(1)
    flat_dst = dst.view(G * N, d)
    offsets = torch.arange(G, device=idx.device).view(G, 1, 1) * N  # (G, 1, 1)
    for r0 in range(0, R, chunk):
        flat = (idx[:, r0 : r0 + chunk] + offsets).reshape(-1)  # (G*r*K,)
        contrib = weights[:, r0 : r0 + chunk, :, None] * rows[:, r0 : r0 + chunk, None, :].float()  # (G, r, K, d)
        flat_dst.index_add_(0, flat, contrib.reshape(-1, d))


class _MemoryQueryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, topk):
        out, idx, p = _memory_query_fwd_launch(q, k, v, mask, topk)
        ctx.save_for_backward(q, k, v, mask, idx, p)
        weights = (p if mask is None else p * mask).to(q.dtype)
        ctx.mark_non_differentiable(idx, weights)
        return out, idx, weights

    @staticmethod
    def backward(ctx, d_out, _d_idx, _d_weights):
        q, k, v, mask, idx, p = ctx.saved_tensors
        dq, dk, dv = _memory_query_bwd_launch(q, k, v, mask, idx, p, d_out)
        return dq, dk, dv, None, None


def memory_query_triton(q, k, v, topk, dropout_mask=None):
    """Fused memory querying on the grouped layout.

    Args:
        q: (G, R, d); k, v: (G, N, d), one dtype of fp32 / bf16 / fp16, on CUDA (or CPU
            under TRITON_INTERPRET=1).
        topk: K, a power of two <= 128, K <= N.
        dropout_mask: optional (G, R, K) multiplier for the weights.

    Returns:
        out (G, R, d) q's dtype (differentiable in q, k, v), idx (G, R, K) int64 sorted by
        descending score with ties to the lowest index, weights (G, R, K) q's dtype after
        dropout (not differentiable).
    """
    return _MemoryQueryTriton.apply(q, k, v, dropout_mask, topk)
