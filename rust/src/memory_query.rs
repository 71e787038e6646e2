//! Fused memory querying on CPU: the `cpu` implementation of `cmn.ops.memory_query`.
//!
//! Layout: G groups; group g has R query rows `q[g]` (R, d) that read its own memory keys
//! `k[g]` and values `v[g]` (N, d); K = topk. Every array is row-major and contiguous.
//!
//! Forward, one task per block of query rows of one group:
//! * scores q k^T by a register-tiled kernel into a tile of (block rows, up to all N
//!   slots) that fits in the L2 cache ([`TILE_BYTES`]): the (R, N) score matrix is never
//!   written to memory;
//! * each tile row is then selected from while it is in cache. A lower bound on the row's
//!   K-th best score comes first (the K-th best of the maxima of 2K interleaved groups of
//!   scores: one vector max per score); then one vector compare per 16 scores finds the
//!   few that reach the bound (a few dozen of 2048 in a typical row), which go into a
//!   small candidate buffer; a full buffer is cut back to its best K by a linear-time
//!   selection, raising the bound. The N scores of a row are never sorted, only the K
//!   winners, at the end;
//! * softmax over the K winners scaled by 1/sqrt(d) (scaling is monotone, so ranking
//!   the raw products ranks the scaled scores), optional dropout multipliers, and the
//!   weighted sum of the K selected value rows.
//!
//! Ranking: higher score first; NaN ranks above every number (as in `torch.topk`);
//! among equal scores (+0 and -0 are equal) the lower slot index wins, and the K
//! winners come out in that order. The selection therefore does not depend on tiling,
//! thread count or timing.
//!
//! Backward, one task per group: each group owns its dK and dV rows, so the scatter into
//! the K selected rows needs no atomics, no locks and no index sort, and sums in a fixed
//! order (query rows ascending): the gradients are deterministic.
//!
//! Kernels are compiled three times (AVX-512, AVX2, portable) and chosen at run time by
//! CPU features ([`Isa`]). The AVX variants form each score with fused multiply-adds over
//! d in ascending order (so they agree bit for bit); the portable one multiplies and adds
//! separately (the same up to rounding).
use std::ops::{Add, AddAssign, Div, Mul, Sub};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::Result;
use crate::invalid;

/// Bytes of one task's score tile (rows of a block x memory slots): it stays in the L2
/// cache, and at the paper's sizes (N = 2048, fp32) holds whole rows, which gives the
/// scan its tightest threshold.
pub const TILE_BYTES: usize = 512 << 10;
/// Row panels (of the kernel's MR rows) per task.
const PANELS_PER_BLOCK: usize = 4;

/// A floating-point element type the kernels run on (f32, f64).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const NAN: Self;
    /// A score and its slot in one integer that orders like the ranking (larger = better).
    type Packed: Copy + Ord + Send + Sync;
    fn pack(self, slot: u32) -> Self::Packed;
    /// Inverse of [`Real::pack`] (-0 comes back as +0; any NaN as one NaN).
    fn unpack(p: Self::Packed) -> (Self, u32);
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_usize(n: usize) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty, $bits:ty, $packed:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const NAN: Self = <$t>::NAN;
            type Packed = $packed;

            #[inline(always)]
            fn pack(self, slot: u32) -> $packed {
                const SIGN: $bits = 1 << (<$bits>::BITS - 1);
                let key: $bits = if self.is_nan() {
                    <$bits>::MAX
                } else {
                    let bits = (self + 0.0).to_bits(); // -0 + 0 = +0: the zeros tie
                    if bits & SIGN != 0 {
                        !bits
                    } else {
                        bits | SIGN
                    }
                };
                ((key as $packed) << 32) | (u32::MAX - slot) as $packed
            }

            #[inline(always)]
            fn unpack(p: $packed) -> ($t, u32) {
                const SIGN: $bits = 1 << (<$bits>::BITS - 1);
                let slot = u32::MAX - (p as u32);
                let key = (p >> 32) as $bits;
                let value = if key == <$bits>::MAX {
                    <$t>::NAN
                } else if key & SIGN != 0 {
                    <$t>::from_bits(key & !SIGN)
                } else {
                    <$t>::from_bits(!key)
                };
                (value, slot)
            }

            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }

            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }

            #[inline(always)]
            fn from_usize(n: usize) -> Self {
                n as $t
            }

            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

impl_real!(f32, u32, u64);
impl_real!(f64, u64, u128);

/// Sizes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub groups: usize,
    pub rows: usize,
    pub slots: usize,
    pub dim: usize,
    pub topk: usize,
}

impl Dims {
    fn check(&self) -> Result<()> {
        let Dims {
            groups,
            rows,
            slots,
            dim,
            topk,
        } = *self;
        if dim == 0 || slots == 0 {
            return Err(invalid!(
                "memory query: d and N must be positive (d={dim}, N={slots})"
            ));
        }
        if topk == 0 || topk > slots {
            return Err(invalid!(
                "memory query: topk must be in [1, N={slots}]; got {topk}"
            ));
        }
        if slots >= u32::MAX as usize {
            return Err(invalid!(
                "memory query: N={slots} exceeds the 32-bit slot index"
            ));
        }
        if groups
            .checked_mul(rows.max(slots))
            .and_then(|n| n.checked_mul(dim.max(topk)))
            .is_none()
        {
            return Err(invalid!("memory query: sizes overflow"));
        }
        Ok(())
    }
}

impl Dims {
    /// Elements of q (and of out, dq, d_out) per group: R * d.
    fn row_len(&self) -> usize {
        self.rows * self.dim
    }

    /// Elements of k, v (and of dk, dv) per group: N * d.
    fn slot_len(&self) -> usize {
        self.slots * self.dim
    }

    /// Elements of idx, probs, mask (and of d_weights) per group: R * K.
    fn sel_len(&self) -> usize {
        self.rows * self.topk
    }
}

/// The inputs of both passes: `q` (G, R, d), `k`, `v` (G, N, d) and optional dropout
/// multipliers `mask` (G, R, K) for the weights.
#[derive(Clone, Copy)]
pub struct Inputs<'a, T> {
    pub dims: Dims,
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub mask: Option<&'a [T]>,
}

impl<T> Inputs<'_, T> {
    fn check(&self) -> Result<()> {
        let d = self.dims;
        d.check()?;
        check_len("q", self.q.len(), d.groups * d.row_len())?;
        check_len("k", self.k.len(), d.groups * d.slot_len())?;
        check_len("v", self.v.len(), d.groups * d.slot_len())?;
        if let Some(mask) = self.mask {
            check_len("mask", mask.len(), d.groups * d.sel_len())?;
        }
        Ok(())
    }
}

/// What the forward writes: `out` (G, R, d), `idx` (G, R, K) in ranking order and
/// `probs` (G, R, K), the softmax weights before dropout.
pub struct Selected<'a, T> {
    pub out: &'a mut [T],
    pub idx: &'a mut [i64],
    pub probs: &'a mut [T],
}

/// What the backward writes: `dq` (G, R, d), `dk`, `dv` (G, N, d).
pub struct Grads<'a, T> {
    pub dq: &'a mut [T],
    pub dk: &'a mut [T],
    pub dv: &'a mut [T],
}

fn check_len(name: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(invalid!(
            "memory query: {name} has {len} elements, expected {want}"
        ));
    }
    Ok(())
}

/// Running top-K of one row: a candidate buffer of at most `cap` entries, cut back to the
/// best K when full (the row's threshold lives next to it, in `Scratch::thresholds`).
struct RowTopK<P> {
    buf: Vec<P>,
    cap: usize,
}

impl<P: Copy + Ord> RowTopK<P> {
    fn new(topk: usize) -> Self {
        let cap = (4 * topk).max(64);
        RowTopK {
            buf: Vec::with_capacity(cap),
            cap,
        }
    }

    /// Keeps the best `topk` entries (in no particular order); returns the worst of them.
    fn shrink(&mut self, topk: usize) -> P {
        let (_, kth, _) = self.buf.select_nth_unstable_by(topk - 1, |a, b| b.cmp(a));
        let kth = *kth;
        self.buf.truncate(topk);
        kth
    }
}

/// `!(s < thr)`: true for a score at least the threshold and whenever either is NaN
/// (NaN scores rank first; a NaN threshold means none is known yet).
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // the negation is the point: NaN must pass
fn not_below<T: Real>(s: T, thr: T) -> bool {
    !(s < thr)
}

/// `bit i = not_below(chunk[i], thr)` for 16 scores: a score at least the threshold, a NaN
/// score, or any score while the threshold is NaN (unknown).
trait LaneMask {
    fn at_least<T: KernelReal>(chunk: &[T; 16], thr: T) -> u32;
}

struct PortableMask;

impl LaneMask for PortableMask {
    #[inline(always)]
    fn at_least<T: KernelReal>(chunk: &[T; 16], thr: T) -> u32 {
        let mut mask = 0;
        for (i, &s) in chunk.iter().enumerate() {
            mask |= u32::from(not_below(s, thr)) << i;
        }
        mask
    }
}

/// Compares in vector registers; only inlined into the entry points compiled with
/// AVX-512 (`isa_entries!`), which `Kernel` only hands out on CPUs that have it.
#[cfg(target_arch = "x86_64")]
struct Avx512Mask;
/// As [`Avx512Mask`], for AVX2.
#[cfg(target_arch = "x86_64")]
struct Avx2Mask;

#[cfg(target_arch = "x86_64")]
impl LaneMask for Avx512Mask {
    #[inline(always)]
    fn at_least<T: KernelReal>(chunk: &[T; 16], thr: T) -> u32 {
        // SAFETY: inlined only into functions compiled for AVX-512 (see above).
        unsafe { T::at_least_avx512(chunk, thr) }
    }
}

#[cfg(target_arch = "x86_64")]
impl LaneMask for Avx2Mask {
    #[inline(always)]
    fn at_least<T: KernelReal>(chunk: &[T; 16], thr: T) -> u32 {
        // SAFETY: inlined only into functions compiled for AVX2 (see above).
        unsafe { T::at_least_avx2(chunk, thr) }
    }
}

/// Scans `scores` (slots `first..first + scores.len()`) into `row`. `threshold` is at
/// most the row's final K-th best score (NaN: unknown) and rises on every shrink.
#[inline(always)]
fn scan_row<T: KernelReal, M: LaneMask>(
    row: &mut RowTopK<T::Packed>,
    threshold: &mut T,
    scores: &[T],
    first: u32,
    topk: usize,
) {
    const LANES: usize = 16;
    let mut chunks = scores.chunks_exact(LANES);
    let mut base = first;
    for chunk in &mut chunks {
        let chunk: &[T; LANES] = chunk.try_into().expect("LANES scores");
        // one vector compare, so most chunks cost a few instructions
        let mut mask = M::at_least(chunk, *threshold);
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            offer(row, threshold, chunk[i], base + i as u32, topk);
        }
        base += LANES as u32;
    }
    for (i, &s) in chunks.remainder().iter().enumerate() {
        offer(row, threshold, s, base + i as u32, topk);
    }
}

/// Adds one score to the row's candidates unless it is below the threshold (ties are
/// kept: the threshold may be the score of a slot that has not been seen yet).
#[inline(always)]
fn offer<T: Real>(
    row: &mut RowTopK<T::Packed>,
    threshold: &mut T,
    score: T,
    slot: u32,
    topk: usize,
) {
    if not_below(score, *threshold) {
        row.buf.push(score.pack(slot));
        if row.buf.len() == row.cap {
            *threshold = T::unpack(row.shrink(topk)).0;
        }
    }
}

/// A score no higher than the K-th best of `scores` (NaN: no bound), from the maxima of
/// `lanes.len()` interleaved groups: those maxima are distinct elements, so the K-th
/// best of them (NaN ranking first) is at most the K-th best of all. Costs one vector
/// max per element and a selection among the few maxima; it lets the scan skip all but
/// a few dozen of the N scores of a typical row.
#[inline(always)]
fn lower_bound<T: Real>(
    scores: &[T],
    lanes: &mut [T],
    keys: &mut Vec<T::Packed>,
    topk: usize,
) -> T {
    let width = lanes.len();
    if topk > width || scores.len() < width {
        return T::NAN;
    }
    // lanes in registers, 64 at a time (independent max chains), each the max over every
    // width-th score
    for (g, lanes) in lanes.chunks_exact_mut(64).enumerate() {
        let mut max: [T; 64] = scores[g * 64..g * 64 + 64].try_into().expect("64 scores");
        for chunk in scores[width..].chunks_exact(width) {
            let chunk: &[T; 64] = chunk[g * 64..g * 64 + 64].try_into().expect("64 scores");
            for l in 0..64 {
                max[l] = if chunk[l] > max[l] { chunk[l] } else { max[l] };
            }
        }
        lanes.copy_from_slice(&max);
    }
    keys.clear();
    keys.extend(lanes.iter().map(|&m| m.pack(0)));
    let (_, kth, _) = keys.select_nth_unstable_by(topk - 1, |a, b| b.cmp(a));
    T::unpack(*kth).0
}

/// The K best entries of a finished row, best first.
fn finish_row<P: Copy + Ord>(row: &mut RowTopK<P>, topk: usize) -> &[P] {
    if row.buf.len() > 2 * topk {
        row.shrink(topk); // a linear selection first pays off on a long buffer only
    }
    row.buf.sort_unstable_by(|a, b| b.cmp(a)); // entries are distinct (slots differ)
    row.buf.truncate(topk);
    &row.buf
}

/// `s[r * ld + j] = sum_c qp[c * MR + r] * kp[c * NR + j]` for r < MR, j < NR; c ascending.
/// `qp` and `kp` are packed panels (d, MR) and (d, NR).
#[inline(always)]
fn micro_tile<T: Real, const MR: usize, const NR: usize>(
    qp: &[T],
    kp: &[T],
    dim: usize,
    s: &mut [T],
    ld: usize,
) {
    let mut acc = [[T::ZERO; NR]; MR];
    for (a, b) in qp.chunks_exact(MR).zip(kp.chunks_exact(NR)).take(dim) {
        let a: &[T; MR] = a.try_into().expect("MR values");
        let b: &[T; NR] = b.try_into().expect("NR values");
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] += a[r] * b[j];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        s[r * ld..r * ld + NR].copy_from_slice(row);
    }
}

/// Scores of a block of packed query panels against packed key panels:
/// `s` (panels * MR, ld) gets columns `0..kp.len() / (dim * NR) * NR`.
#[inline(always)]
fn block_scores<T: Real, const MR: usize, const NR: usize>(
    qp: &[T],
    kp: &[T],
    dim: usize,
    s: &mut [T],
    ld: usize,
) {
    for (p, kpanel) in kp.chunks_exact(dim * NR).enumerate() {
        for (i, qpanel) in qp.chunks_exact(dim * MR).enumerate() {
            micro_tile::<T, MR, NR>(qpanel, kpanel, dim, &mut s[i * MR * ld + p * NR..], ld);
        }
    }
}

// Register tiles (MR rows x NR slots) of the explicit SIMD kernels: NR is two vectors, and
// MR * 2 accumulators + 2 key vectors + 1 broadcast fit the 32 (AVX-512) or 16 (AVX2)
// vector registers.
const MR_AVX512: usize = 12;
const MR_AVX2: usize = 6;
const MR_PORTABLE: usize = 4;
const NR_PORTABLE: usize = 8;

/// A score kernel in explicit SIMD intrinsics with the contract of [`block_scores`]:
/// per register tile, `MR x 2` vector accumulators, one fused multiply-add per element
/// and step of d, d ascending (so every variant rounds the same way).
macro_rules! simd_kernel {
    ($name:ident, $t:ty, $lanes:expr, $mr:expr, $features:literal,
     $zero:ident, $load:ident, $set1:ident, $fma:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(qp: &[$t], kp: &[$t], dim: usize, s: &mut [$t], ld: usize) {
            use std::arch::x86_64::*;
            const NR: usize = 2 * $lanes;
            let (q_panels, k_panels) = (qp.len() / (dim * $mr), kp.len() / (dim * NR));
            assert!(q_panels * dim * $mr == qp.len() && k_panels * dim * NR == kp.len());
            assert!(k_panels * NR <= ld);
            assert!(
                q_panels == 0
                    || k_panels == 0
                    || (q_panels * $mr - 1) * ld + k_panels * NR <= s.len()
            );
            for p in 0..k_panels {
                for i in 0..q_panels {
                    let mut acc = [[$zero(); 2]; $mr];
                    let mut a_ptr = qp.as_ptr().add(i * dim * $mr);
                    let mut b_ptr = kp.as_ptr().add(p * dim * NR);
                    for _ in 0..dim {
                        let b0 = $load(b_ptr);
                        let b1 = $load(b_ptr.add($lanes));
                        for r in 0..$mr {
                            let a = $set1(*a_ptr.add(r));
                            acc[r][0] = $fma(a, b0, acc[r][0]);
                            acc[r][1] = $fma(a, b1, acc[r][1]);
                        }
                        a_ptr = a_ptr.add($mr);
                        b_ptr = b_ptr.add(NR);
                    }
                    let out = s.as_mut_ptr().add(i * $mr * ld + p * NR);
                    for (r, acc) in acc.iter().enumerate() {
                        $store(out.add(r * ld), acc[0]);
                        $store(out.add(r * ld + $lanes), acc[1]);
                    }
                }
            }
        }
    };
}

simd_kernel!(
    scores_avx512_f32,
    f32,
    16,
    MR_AVX512,
    "avx512f,fma",
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);
simd_kernel!(
    scores_avx512_f64,
    f64,
    8,
    MR_AVX512,
    "avx512f,fma",
    _mm512_setzero_pd,
    _mm512_loadu_pd,
    _mm512_set1_pd,
    _mm512_fmadd_pd,
    _mm512_storeu_pd
);
simd_kernel!(
    scores_avx2_f32,
    f32,
    8,
    MR_AVX2,
    "avx2,fma",
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);
simd_kernel!(
    scores_avx2_f64,
    f64,
    4,
    MR_AVX2,
    "avx2,fma",
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    _mm256_storeu_pd
);

fn scores_portable<T: Real>(qp: &[T], kp: &[T], dim: usize, s: &mut [T], ld: usize) {
    block_scores::<T, MR_PORTABLE, NR_PORTABLE>(qp, kp, dim, s, ld)
}

/// Which compiled variant of the kernels to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F + FMA (x86-64).
    Avx512,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// Plain Rust for the build's baseline target.
    Portable,
}

impl Isa {
    /// The fastest variant this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// `self` if this CPU runs it, else the best variant it does run below it.
    pub fn or_supported(self) -> Isa {
        match (self, Isa::detect()) {
            (Isa::Avx512, Isa::Avx512) => Isa::Avx512,
            (Isa::Avx512 | Isa::Avx2, Isa::Avx512 | Isa::Avx2) => Isa::Avx2,
            _ => Isa::Portable,
        }
    }
}

/// Inputs of one task of the forward: a block of query rows of one group.
struct BlockIn<'a, T> {
    q: &'a [T],
    kp: &'a [T],
    v: &'a [T],
    mask: Option<&'a [T]>,
    dims: Dims,
    scale: T,
}

/// Inputs of one task of the backward: one group.
struct GroupIn<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    mask: Option<&'a [T]>,
    idx: &'a [i64],
    probs: &'a [T],
    d_out: &'a [T],
    d_weights: Option<&'a [T]>,
    dim: usize,
    topk: usize,
    scale: T,
}

type ScoresFn<T> = unsafe fn(&[T], &[T], usize, &mut [T], usize);
type BlockFn<T> = unsafe fn(&Kernel<T>, &mut Scratch<T>, BlockIn<'_, T>, Selected<'_, T>);
type GroupBackwardFn<T> = unsafe fn(GroupIn<'_, T>, Grads<'_, T>);

/// The kernels of one [`Isa`] for one element type (opaque).
pub struct Kernel<T: Real> {
    mr: usize,
    nr: usize,
    // Safety: built only by `KernelReal::kernel`, for features this CPU has.
    scores: ScoresFn<T>,
    block: BlockFn<T>,
    backward: GroupBackwardFn<T>,
}

/// The forward task and the backward task compiled with one set of CPU features: every
/// helper they call is inlined, so the whole loop nest uses the wider vectors.
macro_rules! isa_entries {
    ($block:ident, $backward:ident, $mask:ty, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $block<T: KernelReal>(
            kernel: &Kernel<T>,
            s: &mut Scratch<T>,
            input: BlockIn<'_, T>,
            output: Selected<'_, T>,
        ) {
            block_forward::<T, $mask>(kernel, s, input, output)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $backward<T: Real>(input: GroupIn<'_, T>, grads: Grads<'_, T>) {
            group_backward(input, grads)
        }
    };
}

isa_entries!(
    block_forward_avx512,
    group_backward_avx512,
    Avx512Mask,
    "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt"
);
isa_entries!(
    block_forward_avx2,
    group_backward_avx2,
    Avx2Mask,
    "avx2,fma,bmi1,bmi2,lzcnt,popcnt"
);

fn block_forward_portable<T: KernelReal>(
    kernel: &Kernel<T>,
    s: &mut Scratch<T>,
    input: BlockIn<'_, T>,
    output: Selected<'_, T>,
) {
    block_forward::<T, PortableMask>(kernel, s, input, output)
}

fn group_backward_portable<T: Real>(input: GroupIn<'_, T>, grads: Grads<'_, T>) {
    group_backward(input, grads)
}

/// Element types with compiled kernels (f32, f64).
pub trait KernelReal: Real {
    /// The kernels of `isa`, or of the best variant below it this CPU runs.
    fn kernel(isa: Isa) -> Kernel<Self>;
    /// [`LaneMask::at_least`] in AVX-512 (safety: the CPU has AVX-512F).
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn at_least_avx512(chunk: &[Self; 16], thr: Self) -> u32;
    /// [`LaneMask::at_least`] in AVX2 (safety: the CPU has AVX2).
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn at_least_avx2(chunk: &[Self; 16], thr: Self) -> u32;
}

macro_rules! impl_kernel_real {
    ($t:ty, $avx512:ident, $avx2:ident, $avx512_mask:expr, $avx2_mask:expr) => {
        impl KernelReal for $t {
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn at_least_avx512(chunk: &[$t; 16], thr: $t) -> u32 {
                $avx512_mask(chunk, thr)
            }

            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn at_least_avx2(chunk: &[$t; 16], thr: $t) -> u32 {
                $avx2_mask(chunk, thr)
            }

            fn kernel(isa: Isa) -> Kernel<$t> {
                let two_vectors = |bytes: usize| 2 * bytes / std::mem::size_of::<$t>();
                match isa.or_supported() {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => Kernel {
                        mr: MR_AVX512,
                        nr: two_vectors(64),
                        scores: $avx512,
                        block: block_forward_avx512::<$t>,
                        backward: group_backward_avx512::<$t>,
                    },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => Kernel {
                        mr: MR_AVX2,
                        nr: two_vectors(32),
                        scores: $avx2,
                        block: block_forward_avx2::<$t>,
                        backward: group_backward_avx2::<$t>,
                    },
                    _ => Kernel {
                        mr: MR_PORTABLE,
                        nr: NR_PORTABLE,
                        scores: scores_portable::<$t>,
                        block: block_forward_portable::<$t>,
                        backward: group_backward_portable::<$t>,
                    },
                }
            }
        }
    };
}

// Lane masks: `_CMP_NLT_UQ` is `!(s < thr)`, true when either side is NaN.
#[cfg(target_arch = "x86_64")]
mod lane_masks {
    use std::arch::x86_64::*;

    #[inline(always)]
    pub unsafe fn f32_avx512(chunk: &[f32; 16], thr: f32) -> u32 {
        let s = _mm512_loadu_ps(chunk.as_ptr());
        u32::from(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(s, _mm512_set1_ps(thr)))
    }

    #[inline(always)]
    pub unsafe fn f64_avx512(chunk: &[f64; 16], thr: f64) -> u32 {
        let t = _mm512_set1_pd(thr);
        let lo = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(_mm512_loadu_pd(chunk.as_ptr()), t);
        let hi = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(_mm512_loadu_pd(chunk.as_ptr().add(8)), t);
        u32::from(lo) | u32::from(hi) << 8
    }

    #[inline(always)]
    pub unsafe fn f32_avx2(chunk: &[f32; 16], thr: f32) -> u32 {
        let t = _mm256_set1_ps(thr);
        let half = |p: *const f32| {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_loadu_ps(p), t)) as u32
        };
        half(chunk.as_ptr()) | half(chunk.as_ptr().add(8)) << 8
    }

    #[inline(always)]
    pub unsafe fn f64_avx2(chunk: &[f64; 16], thr: f64) -> u32 {
        let t = _mm256_set1_pd(thr);
        let quarter = |p: *const f64| {
            _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_NLT_UQ>(_mm256_loadu_pd(p), t)) as u32
        };
        (0..4).fold(0, |m, i| m | quarter(chunk.as_ptr().add(4 * i)) << (4 * i))
    }
}

impl_kernel_real!(
    f32,
    scores_avx512_f32,
    scores_avx2_f32,
    lane_masks::f32_avx512,
    lane_masks::f32_avx2
);
impl_kernel_real!(
    f64,
    scores_avx512_f64,
    scores_avx2_f64,
    lane_masks::f64_avx512,
    lane_masks::f64_avx2
);

/// Keys of one group packed as panels of NR slots, (ceil(N / NR), d, NR), zero-padded.
fn pack_keys<T: Real>(k: &[T], slots: usize, dim: usize, nr: usize, out: &mut [T]) {
    for (p, panel) in out.chunks_exact_mut(dim * nr).enumerate() {
        for j in 0..nr {
            let n = p * nr + j;
            for c in 0..dim {
                panel[c * nr + j] = if n < slots { k[n * dim + c] } else { T::ZERO };
            }
        }
    }
}

/// Query rows packed as panels of MR rows, (panels, d, MR), zero-padded.
fn pack_queries<T: Real>(q: &[T], dim: usize, mr: usize, out: &mut [T]) {
    let rows = q.len() / dim;
    for (i, panel) in out.chunks_exact_mut(dim * mr).enumerate() {
        for r in 0..mr {
            let row = i * mr + r;
            for c in 0..dim {
                panel[c * mr + r] = if row < rows {
                    q[row * dim + c]
                } else {
                    T::ZERO
                };
            }
        }
    }
}

/// `out = sum_j w[j] * rows[idx[j]]` (j ascending), each row of length `out.len()`.
/// Columns are summed in registers, 64 (four vectors of f32) at a time: the K row reads
/// are independent loads and the four sums independent chains, instead of a chain of
/// read-modify-writes of `out`.
#[inline(always)]
fn weighted_rows<T: Real>(out: &mut [T], weights: &[T], idx: &[i64], rows: &[T]) {
    const COLS: usize = 64;
    let dim = out.len();
    let mut blocks = out.chunks_exact_mut(COLS);
    for (b, block) in (&mut blocks).enumerate() {
        let mut acc = [T::ZERO; COLS];
        for (&w, &i) in weights.iter().zip(idx) {
            let row: &[T; COLS] = rows[i as usize * dim + b * COLS..][..COLS]
                .try_into()
                .expect("COLS values");
            for c in 0..COLS {
                acc[c] += w * row[c];
            }
        }
        block.copy_from_slice(&acc);
    }
    let done = dim - blocks.into_remainder().len();
    for c in done..dim {
        out[c] = weights
            .iter()
            .zip(idx)
            .fold(T::ZERO, |s, (&w, &i)| s + w * rows[i as usize * dim + c]);
    }
}

/// `sum_c a[c] * b[c]` in 16 interleaved partial sums, then those added in lane order
/// (a tree of pairwise adds would stop the compiler from keeping them in one vector).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 16;
    let mut acc = [T::ZERO; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .fold(T::ZERO, |s, (&x, &y)| s + x * y);
    for (x, y) in a_chunks.zip(b_chunks) {
        let x: &[T; LANES] = x.try_into().expect("LANES values");
        let y: &[T; LANES] = y.try_into().expect("LANES values");
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// `dst += w * src`.
#[inline(always)]
fn axpy<T: Real>(dst: &mut [T], w: T, src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += w * s;
    }
}

/// Softmax of `raw / scale` over the K winners (NaN anywhere gives NaN everywhere).
#[inline(always)]
fn softmax_scaled<T: Real>(raw: &[T], scale: T, probs: &mut [T]) {
    let mut max = raw[0] / scale;
    for &x in raw {
        let x = x / scale;
        if x > max || x.is_nan() {
            max = x;
        }
    }
    let mut sum = T::ZERO;
    for (p, &x) in probs.iter_mut().zip(raw) {
        *p = (x / scale - max).exp();
        sum += *p;
    }
    for p in probs.iter_mut() {
        *p = *p / sum;
    }
}

/// Scratch of one forward task, reused across the blocks a worker runs.
pub struct Scratch<T: Real> {
    qp: Vec<T>,
    scores: Vec<T>,
    ld: usize,
    rows: Vec<RowTopK<T::Packed>>,
    thresholds: Vec<T>,
    lanes: Vec<T>,
    keys: Vec<T::Packed>,
    raw: Vec<T>,
    weights: Vec<T>,
}

/// Forward pass: `out` = sum_j probs_j * mask_j * v[idx_j] over the K best slots of
/// each query row. Runs on the current rayon pool with the kernels of `isa` (or the best
/// this CPU runs below it).
pub fn forward<T: KernelReal>(
    input: Inputs<'_, T>,
    output: Selected<'_, T>,
    isa: Isa,
) -> Result<()> {
    input.check()?;
    let Inputs {
        dims,
        q,
        k,
        v,
        mask,
    } = input;
    let Selected { out, idx, probs } = output;
    let Dims {
        groups,
        rows,
        slots,
        dim,
        topk,
    } = dims;
    check_len("out", out.len(), groups * dims.row_len())?;
    check_len("idx", idx.len(), groups * dims.sel_len())?;
    check_len("probs", probs.len(), groups * dims.sel_len())?;
    if rows == 0 || groups == 0 {
        return Ok(());
    }
    let kernel = T::kernel(isa);
    let (mr, nr) = (kernel.mr, kernel.nr);
    let panel_len = dim * nr;
    let group_packed = slots.div_ceil(nr) * panel_len;
    let mut packed = vec![T::ZERO; groups * group_packed];
    packed
        .par_chunks_mut(group_packed)
        .zip(k.par_chunks(slots * dim))
        .for_each(|(out, k)| pack_keys(k, slots, dim, nr, out));

    let block_rows = mr * PANELS_PER_BLOCK;
    // columns per tile: as many as fit TILE_BYTES, in equal tiles of whole panels
    let max_cols = (TILE_BYTES / std::mem::size_of::<T>() / block_rows / nr).max(1) * nr;
    let tiles = slots.div_ceil(max_cols);
    let ld = slots.div_ceil(tiles).div_ceil(nr) * nr;
    let scale = T::from_usize(dim).sqrt();
    let new_scratch = || Scratch {
        qp: vec![T::ZERO; block_rows * dim],
        scores: vec![T::ZERO; block_rows * ld],
        ld,
        rows: (0..block_rows).map(|_| RowTopK::new(topk)).collect(),
        thresholds: vec![T::NAN; block_rows],
        lanes: vec![T::ZERO; (2 * topk).next_multiple_of(64)], // a multiple of 64
        keys: Vec::new(),
        raw: vec![T::ZERO; topk],
        weights: vec![T::ZERO; topk],
    };
    let kernel = &kernel;
    out.par_chunks_mut(rows * dim)
        .zip(idx.par_chunks_mut(rows * topk))
        .zip(probs.par_chunks_mut(rows * topk))
        .enumerate()
        .for_each(|(g, ((out, idx), probs))| {
            let q = &q[g * rows * dim..][..rows * dim];
            let kp = &packed[g * group_packed..][..group_packed];
            let v = &v[g * slots * dim..][..slots * dim];
            let mask = mask.map(|m| &m[g * rows * topk..][..rows * topk]);
            out.par_chunks_mut(block_rows * dim)
                .zip(idx.par_chunks_mut(block_rows * topk))
                .zip(probs.par_chunks_mut(block_rows * topk))
                .enumerate()
                .for_each_init(new_scratch, |s, (b, ((out, idx), probs))| {
                    let r0 = b * block_rows;
                    let n_rows = out.len() / dim;
                    let input = BlockIn {
                        q: &q[r0 * dim..(r0 + n_rows) * dim],
                        kp,
                        v,
                        mask: mask.map(|m| &m[r0 * topk..(r0 + n_rows) * topk]),
                        dims,
                        scale,
                    };
                    // SAFETY: `kernel` holds the entry points of features this CPU has.
                    unsafe { (kernel.block)(kernel, s, input, Selected { out, idx, probs }) };
                });
        });
    Ok(())
}

/// One block of at most `block_rows` query rows of one group.
#[inline(always)]
fn block_forward<T: KernelReal, M: LaneMask>(
    kernel: &Kernel<T>,
    s: &mut Scratch<T>,
    input: BlockIn<'_, T>,
    output: Selected<'_, T>,
) {
    let BlockIn {
        q,
        kp,
        v,
        mask,
        dims,
        scale,
    } = input;
    let Selected { out, idx, probs } = output;
    let Dims {
        slots, dim, topk, ..
    } = dims;
    let (mr, nr) = (kernel.mr, kernel.nr);
    let n_rows = q.len() / dim;
    let qp = &mut s.qp[..n_rows.div_ceil(mr) * mr * dim];
    pack_queries(q, dim, mr, qp);
    for (row, thr) in s.rows.iter_mut().zip(s.thresholds.iter_mut()) {
        row.buf.clear();
        *thr = T::NAN;
    }
    let ld = s.ld;
    for (t, kp_tile) in kp.chunks(ld / nr * dim * nr).enumerate() {
        let first = t * ld;
        let cols = (slots - first).min(ld);
        // SAFETY: `kernel.scores` runs on this CPU (see `Kernel`).
        unsafe { (kernel.scores)(qp, kp_tile, dim, &mut s.scores, ld) };
        for r in 0..n_rows {
            let scores = &s.scores[r * ld..r * ld + cols];
            let threshold = &mut s.thresholds[r];
            let bound = lower_bound(scores, &mut s.lanes, &mut s.keys, topk);
            if threshold.is_nan() || bound > *threshold {
                *threshold = bound;
            }
            scan_row::<T, M>(&mut s.rows[r], threshold, scores, first as u32, topk);
        }
    }
    for r in 0..n_rows {
        let sel = r * topk..(r + 1) * topk;
        let best = finish_row(&mut s.rows[r], topk);
        for (j, &p) in best.iter().enumerate() {
            let (score, slot) = T::unpack(p);
            s.raw[j] = score;
            idx[r * topk + j] = slot as i64;
        }
        softmax_scaled(&s.raw, scale, &mut probs[sel.clone()]);
        let weights = match mask {
            Some(m) => {
                for ((w, &p), &m) in s
                    .weights
                    .iter_mut()
                    .zip(&probs[sel.clone()])
                    .zip(&m[sel.clone()])
                {
                    *w = p * m;
                }
                &s.weights[..]
            }
            None => &probs[sel.clone()],
        };
        weighted_rows(&mut out[r * dim..(r + 1) * dim], weights, &idx[sel], v);
    }
}

/// Backward pass of [`forward`], from its inputs, its saved `idx` and `probs`, the
/// gradient `d_out` (G, R, d) and optionally `d_weights` (G, R, K), the gradient of the
/// weights after dropout when the caller used them. Overwrites `grads`. Runs on the
/// current rayon pool, one task per group.
pub fn backward<T: KernelReal>(
    input: Inputs<'_, T>,
    idx: &[i64],
    probs: &[T],
    d_out: &[T],
    d_weights: Option<&[T]>,
    grads: Grads<'_, T>,
    isa: Isa,
) -> Result<()> {
    input.check()?;
    let Inputs {
        dims,
        q,
        k,
        v,
        mask,
    } = input;
    let Grads { dq, dk, dv } = grads;
    let Dims {
        groups,
        slots,
        dim,
        topk,
        ..
    } = dims;
    let (row_len, slot_len, sel_len) = (dims.row_len(), dims.slot_len(), dims.sel_len());
    for (name, len, want) in [
        ("idx", idx.len(), sel_len),
        ("probs", probs.len(), sel_len),
        ("d_out", d_out.len(), row_len),
        ("dq", dq.len(), row_len),
        ("dk", dk.len(), slot_len),
        ("dv", dv.len(), slot_len),
        (
            "d_weights",
            d_weights.map_or(groups * sel_len, <[T]>::len),
            sel_len,
        ),
    ] {
        check_len(name, len, groups * want)?;
    }
    if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as usize >= slots) {
        return Err(invalid!(
            "memory query: index {bad} out of range [0, {slots})"
        ));
    }
    if groups == 0 {
        return Ok(());
    }
    let kernel = T::kernel(isa);
    let scale = T::from_usize(dim).sqrt();
    dq.par_chunks_mut(row_len.max(1))
        .zip(dk.par_chunks_mut(slot_len))
        .zip(dv.par_chunks_mut(slot_len))
        .enumerate()
        .for_each(|(g, ((dq, dk), dv))| {
            let sel = g * sel_len..(g + 1) * sel_len;
            let input = GroupIn {
                q: &q[g * row_len..(g + 1) * row_len],
                k: &k[g * slot_len..(g + 1) * slot_len],
                v: &v[g * slot_len..(g + 1) * slot_len],
                mask: mask.map(|m| &m[sel.clone()]),
                idx: &idx[sel.clone()],
                probs: &probs[sel.clone()],
                d_out: &d_out[g * row_len..(g + 1) * row_len],
                d_weights: d_weights.map(|dw| &dw[sel.clone()]),
                dim,
                topk,
                scale,
            };
            // SAFETY: `kernel` holds the entry points of features this CPU has.
            unsafe { (kernel.backward)(input, Grads { dq, dk, dv }) };
        });
    Ok(())
}

/// The backward of one group, query rows in ascending order.
#[inline(always)]
fn group_backward<T: Real>(input: GroupIn<'_, T>, grads: Grads<'_, T>) {
    let GroupIn {
        q,
        k,
        v,
        mask,
        idx,
        probs,
        d_out,
        d_weights,
        dim,
        topk,
        scale,
    } = input;
    let Grads { dq, dk, dv } = grads;
    dk.fill(T::ZERO);
    dv.fill(T::ZERO);
    let (mut d_probs, mut d_scores) = (vec![T::ZERO; topk], vec![T::ZERO; topk]);
    let rows = q.len() / dim;
    for r in 0..rows {
        let sel = r * topk..(r + 1) * topk;
        let (p, slots) = (&probs[sel.clone()], &idx[sel.clone()]);
        let (q_row, d_out_row) = (&q[r * dim..(r + 1) * dim], &d_out[r * dim..(r + 1) * dim]);
        // out = sum_j w_j v[idx_j] with w = p * mask: dv[idx_j] += w_j d_out, dw_j = d_out . v[idx_j]
        for j in 0..topk {
            let row = slots[j] as usize * dim..(slots[j] as usize + 1) * dim;
            let keep = mask.map_or(T::from_usize(1), |m| m[r * topk + j]);
            axpy(&mut dv[row.clone()], p[j] * keep, d_out_row);
            let mut dw = dot(d_out_row, &v[row]);
            if let Some(dwx) = d_weights {
                dw += dwx[r * topk + j];
            }
            d_probs[j] = dw * keep;
        }
        // softmax backward, then the 1/sqrt(d) of the scores
        let mut inner = T::ZERO;
        for j in 0..topk {
            inner += p[j] * d_probs[j];
        }
        for j in 0..topk {
            d_scores[j] = p[j] * (d_probs[j] - inner) / scale;
        }
        // scores = q k[idx]^T: dq = sum_j ds_j k[idx_j], dk[idx_j] += ds_j q
        weighted_rows(&mut dq[r * dim..(r + 1) * dim], &d_scores, slots, k);
        for j in 0..topk {
            let row = slots[j] as usize * dim..(slots[j] as usize + 1) * dim;
            axpy(&mut dk[row], d_scores[j], q_row);
        }
    }
}

/// Runs `f` on a rayon pool of `threads` threads (0: rayon's default), built once per
/// thread count and kept: callers pass torch's intra-op thread count, so one setting
/// (`torch.set_num_threads`) sizes both, and as the two never run at the same time,
/// no more threads than that are busy. A forked child (a data-loader worker, say) does
/// not inherit the parent's pool threads, so it builds its own.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    type Pools = Vec<(u32, usize, Arc<rayon::ThreadPool>)>;
    static POOLS: Mutex<Pools> = Mutex::new(Vec::new());
    let pid = std::process::id();
    let pool = {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if pools.iter().any(|(owner, _, _)| *owner != pid) {
            // pools of the parent process: their threads are not here; never drop them
            // (that would signal threads that do not exist), just forget them
            std::mem::forget(std::mem::take(&mut *pools));
        }
        match pools.iter().find(|(_, n, _)| *n == threads) {
            Some((_, _, pool)) => pool.clone(),
            None => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("cmn-memq-{i}"))
                    .build()
                    .map_err(|e| invalid!("memory query: cannot start {threads} threads: {e}"))?;
                let pool = Arc::new(pool);
                pools.push((pid, threads, pool.clone()));
                pool
            }
        }
    };
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }

        /// Small integers in [-3, 3]: their dot products are exact in any order, and tie often.
        fn int(&mut self) -> f64 {
            (self.next() % 7) as f64 - 3.0
        }
    }

    const ISAS: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    fn dims(groups: usize, rows: usize, slots: usize, dim: usize, topk: usize) -> Dims {
        Dims {
            groups,
            rows,
            slots,
            dim,
            topk,
        }
    }

    fn inputs_of<'a, T>(
        d: Dims,
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
        mask: Option<&'a [T]>,
    ) -> Inputs<'a, T> {
        Inputs {
            dims: d,
            q,
            k,
            v,
            mask,
        }
    }

    /// Gradient buffers for `q`, `k`, `v` (filled with junk: backward must overwrite).
    fn grad_buffers<T: Real>(q: &[T], k: &[T], v: &[T], junk: T) -> (Vec<T>, Vec<T>, Vec<T>) {
        (
            vec![junk; q.len()],
            vec![junk; k.len()],
            vec![junk; v.len()],
        )
    }

    fn grads<'a, T>(g: &'a mut (Vec<T>, Vec<T>, Vec<T>)) -> Grads<'a, T> {
        Grads {
            dq: &mut g.0,
            dk: &mut g.1,
            dv: &mut g.2,
        }
    }

    struct Fwd<T> {
        out: Vec<T>,
        idx: Vec<i64>,
        probs: Vec<T>,
    }

    fn run_forward<T: KernelReal>(
        d: Dims,
        q: &[T],
        k: &[T],
        v: &[T],
        mask: Option<&[T]>,
        isa: Isa,
    ) -> Fwd<T> {
        let mut f = Fwd {
            out: vec![T::ZERO; d.groups * d.rows * d.dim],
            idx: vec![0; d.groups * d.rows * d.topk],
            probs: vec![T::ZERO; d.groups * d.rows * d.topk],
        };
        let output = Selected {
            out: &mut f.out,
            idx: &mut f.idx,
            probs: &mut f.probs,
        };
        forward(inputs_of(d, q, k, v, mask), output, isa).unwrap();
        f
    }

    /// The spec in f64: all N scores, a stable sort (best first, lowest slot among
    /// equals), softmax of the first K scaled by 1/sqrt(d), weighted sum of value rows.
    fn reference_forward(
        d: Dims,
        q: &[f64],
        k: &[f64],
        v: &[f64],
        mask: Option<&[f64]>,
    ) -> Fwd<f64> {
        let mut f = Fwd {
            out: vec![0.0; d.groups * d.rows * d.dim],
            idx: vec![0; d.groups * d.rows * d.topk],
            probs: vec![0.0; d.groups * d.rows * d.topk],
        };
        for g in 0..d.groups {
            for r in 0..d.rows {
                let row = g * d.rows + r;
                let qr = &q[row * d.dim..][..d.dim];
                let scores: Vec<f64> = (0..d.slots)
                    .map(|n| {
                        qr.iter()
                            .zip(&k[(g * d.slots + n) * d.dim..][..d.dim])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let mut order: Vec<usize> = (0..d.slots).collect();
                order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap());
                let top = &order[..d.topk];
                let max = scores[top[0]] / (d.dim as f64).sqrt();
                let e: Vec<f64> = top
                    .iter()
                    .map(|&n| (scores[n] / (d.dim as f64).sqrt() - max).exp())
                    .collect();
                let sum: f64 = e.iter().sum();
                for (j, &n) in top.iter().enumerate() {
                    let p = e[j] / sum;
                    f.idx[row * d.topk + j] = n as i64;
                    f.probs[row * d.topk + j] = p;
                    let w = p * mask.map_or(1.0, |m| m[row * d.topk + j]);
                    for c in 0..d.dim {
                        f.out[row * d.dim + c] += w * v[(g * d.slots + n) * d.dim + c];
                    }
                }
            }
        }
        f
    }

    fn max_diff<T: Copy + Into<f64>>(a: &[T], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&x, y)| (x.into() - y).abs())
            .fold(0.0, f64::max)
    }

    fn to_f32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    fn inputs(
        d: Dims,
        rng: &mut Rng,
        value: fn(&mut Rng) -> f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let q = (0..d.groups * d.rows * d.dim).map(|_| value(rng)).collect();
        let k = (0..d.groups * d.slots * d.dim)
            .map(|_| value(rng))
            .collect();
        let v = (0..d.groups * d.slots * d.dim)
            .map(|_| rng.unit())
            .collect();
        (q, k, v)
    }

    // (G, R, N, d, K): one tile and several (f32 tiles hold 2,720 slots with AVX-512,
    // fp64 half that), partial row blocks and panels, K = 1 and K = N, d below 16
    const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        (2, 5, 37, 8, 4),
        (1, 50, 3001, 5, 7),
        (3, 13, 64, 16, 64),
        (1, 7, 100, 3, 1),
        (2, 61, 300, 20, 32),
        (1, 4, 6000, 4, 40),
    ];

    #[test]
    fn packing_orders_like_the_ranking() {
        let values = [
            f64::NEG_INFINITY,
            -2.5,
            -1e-300,
            -0.0,
            0.0,
            1e-300,
            3.0,
            f64::INFINITY,
            f64::NAN,
        ];
        for &a in &values {
            for &b in &values {
                for (sa, sb) in [(1u32, 2u32), (2, 1)] {
                    // a ranks before b: higher value, NaN highest, +0 == -0, then lower slot
                    let rank = |x: f64| (x.is_nan(), if x.is_nan() { 0.0 } else { x + 0.0 });
                    let before = |x: f64, y: f64| {
                        let (rx, ry) = (rank(x), rank(y));
                        rx.0 & !ry.0 || (rx.0 == ry.0 && (rx.1 > ry.1 || (rx.1 == ry.1 && sa < sb)))
                    };
                    assert_eq!(
                        a.pack(sa) > b.pack(sb),
                        before(a, b),
                        "f64 {a} {sa} vs {b} {sb}"
                    );
                    let (a32, b32) = (a as f32, b as f32);
                    let before32 = before(a32 as f64, b32 as f64);
                    assert_eq!(
                        a32.pack(sa) > b32.pack(sb),
                        before32,
                        "f32 {a32} {sa} vs {b32} {sb}"
                    );
                }
            }
            let (back, slot) = f64::unpack(a.pack(7));
            assert_eq!(slot, 7);
            assert!(
                back == a || (back.is_nan() && a.is_nan()),
                "{a} came back as {back}"
            );
            let (back32, _) = f32::unpack((a as f32).pack(0));
            assert!(back32 == a as f32 || (back32.is_nan() && a.is_nan()));
        }
    }

    #[test]
    fn forward_matches_the_spec_exactly_on_integer_scores() {
        // integer scores are exact in any summation order and tie often: the selection
        // must equal the stable sort's, for every kernel variant and both types
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for &(g, r, n, dim, topk) in &SHAPES {
            let d = dims(g, r, n, dim, topk);
            let (q, k, v) = inputs(d, &mut rng, Rng::int);
            let spec = reference_forward(d, &q, &k, &v, None);
            for isa in ISAS {
                let got = run_forward(d, &q, &k, &v, None, isa);
                assert_eq!(got.idx, spec.idx, "f64 {isa:?} {:?}", (g, r, n, dim, topk));
                assert!(max_diff(&got.probs, &spec.probs) < 1e-14);
                assert!(max_diff(&got.out, &spec.out) < 1e-13);
                let (q32, k32, v32) = (to_f32(&q), to_f32(&k), to_f32(&v));
                let got = run_forward(d, &q32, &k32, &v32, None, isa);
                assert_eq!(got.idx, spec.idx, "f32 {isa:?} {:?}", (g, r, n, dim, topk));
                assert!(max_diff(&got.probs, &spec.probs) < 1e-6);
                assert!(max_diff(&got.out, &spec.out) < 1e-5);
            }
        }
    }

    #[test]
    fn forward_matches_the_spec_on_random_scores_with_dropout() {
        let mut rng = Rng(12345);
        let d = dims(2, 30, 500, 16, 12);
        let (q, k, v) = inputs(d, &mut rng, Rng::unit);
        let mask: Vec<f64> = (0..d.groups * d.rows * d.topk)
            .map(|_| {
                if rng.next().is_multiple_of(4) {
                    0.0
                } else {
                    4.0 / 3.0
                }
            })
            .collect();
        let spec = reference_forward(d, &q, &k, &v, Some(&mask));
        for isa in ISAS {
            let got = run_forward(d, &q, &k, &v, Some(&mask), isa);
            assert_eq!(got.idx, spec.idx);
            assert!(max_diff(&got.out, &spec.out) < 1e-13);
        }
    }

    #[test]
    fn nan_scores_rank_first_and_equal_scores_by_slot() {
        let d = dims(1, 3, 50, 4, 5);
        let mut q = vec![1.0f32; 12];
        q[4] = f32::NAN; // row 1: every score NaN
        let mut k = vec![0.5f32; 200];
        k[4 * 30] = f32::NAN; // slot 30: NaN score in every row
        let v = vec![1.0f32; 200];
        for isa in ISAS {
            let got = run_forward(d, &q, &k, &v, None, isa);
            assert_eq!(&got.idx[0..5], &[30, 0, 1, 2, 3]); // NaN first, then ties by slot
            assert_eq!(&got.idx[5..10], &[0, 1, 2, 3, 4]);
            assert!(got.out[..4].iter().all(|x| x.is_nan())); // a NaN weight spreads, as in torch
            assert!(got.out[4..8].iter().all(|x| x.is_nan()));
        }
    }

    /// The backward in f64 by the chain rule, written out directly.
    #[allow(clippy::too_many_arguments)]
    fn reference_backward(
        d: Dims,
        q: &[f64],
        k: &[f64],
        v: &[f64],
        mask: Option<&[f64]>,
        f: &Fwd<f64>,
        d_out: &[f64],
        d_weights: Option<&[f64]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let scale = (d.dim as f64).sqrt();
        for g in 0..d.groups {
            for r in 0..d.rows {
                let row = g * d.rows + r;
                let sel = row * d.topk..(row + 1) * d.topk;
                let slot = |j: usize| (g * d.slots + f.idx[sel.start + j] as usize) * d.dim;
                let keep = |j: usize| mask.map_or(1.0, |m| m[sel.start + j]);
                let dp: Vec<f64> = (0..d.topk)
                    .map(|j| {
                        let dw: f64 = (0..d.dim)
                            .map(|c| d_out[row * d.dim + c] * v[slot(j) + c])
                            .sum::<f64>()
                            + d_weights.map_or(0.0, |w| w[sel.start + j]);
                        dw * keep(j)
                    })
                    .collect();
                let p = &f.probs[sel.clone()];
                let inner: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..d.topk {
                    let ds = p[j] * (dp[j] - inner) / scale;
                    for c in 0..d.dim {
                        dv[slot(j) + c] += p[j] * keep(j) * d_out[row * d.dim + c];
                        dq[row * d.dim + c] += ds * k[slot(j) + c];
                        dk[slot(j) + c] += ds * q[row * d.dim + c];
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    #[test]
    fn backward_matches_the_chain_rule() {
        let mut rng = Rng(777);
        for &(g, r, n, dim, topk) in &SHAPES[..5] {
            let d = dims(g, r, n, dim, topk);
            let (q, k, v) = inputs(d, &mut rng, Rng::unit);
            let sel = g * r * topk;
            let mask: Vec<f64> = (0..sel)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
                .collect();
            let d_out: Vec<f64> = (0..g * r * dim).map(|_| rng.unit()).collect();
            let d_w: Vec<f64> = (0..sel).map(|_| rng.unit()).collect();
            let f = reference_forward(d, &q, &k, &v, Some(&mask));
            let spec = reference_backward(d, &q, &k, &v, Some(&mask), &f, &d_out, Some(&d_w));
            let spec_unmasked = reference_backward(d, &q, &k, &v, None, &f, &d_out, None);
            let (q32, k32, v32) = (to_f32(&q), to_f32(&k), to_f32(&v));
            let (probs32, d_out32) = (to_f32(&f.probs), to_f32(&d_out));
            for isa in ISAS {
                let mut got = grad_buffers(&q, &k, &v, 9.0);
                let input = inputs_of(d, &q, &k, &v, Some(&mask));
                backward(
                    input,
                    &f.idx,
                    &f.probs,
                    &d_out,
                    Some(&d_w),
                    grads(&mut got),
                    isa,
                )
                .unwrap();
                assert!(max_diff(&got.0, &spec.0) < 1e-13);
                assert!(max_diff(&got.1, &spec.1) < 1e-13 && max_diff(&got.2, &spec.2) < 1e-13);
                let mut got = grad_buffers(&q32, &k32, &v32, 9.0);
                let input = inputs_of(d, &q32, &k32, &v32, None);
                backward(
                    input,
                    &f.idx,
                    &probs32,
                    &d_out32,
                    None,
                    grads(&mut got),
                    isa,
                )
                .unwrap();
                assert!(max_diff(&got.0, &spec_unmasked.0) < 1e-5);
                assert!(
                    max_diff(&got.1, &spec_unmasked.1) < 1e-5
                        && max_diff(&got.2, &spec_unmasked.2) < 1e-5
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // L = sum(out * d_out) + sum(weights * d_weights); the selection is fixed near q
        let mut rng = Rng(4242);
        let d = dims(1, 3, 40, 6, 5);
        let (q, k, v) = inputs(d, &mut rng, Rng::unit);
        let d_out: Vec<f64> = (0..18).map(|_| rng.unit()).collect();
        let d_w: Vec<f64> = (0..15).map(|_| rng.unit()).collect();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let f = run_forward(d, q, k, v, None, Isa::Portable);
            let a: f64 = f.out.iter().zip(&d_out).map(|(x, y)| x * y).sum();
            a + f.probs.iter().zip(&d_w).map(|(x, y)| x * y).sum::<f64>()
        };
        let f = run_forward(d, &q, &k, &v, None, Isa::Portable);
        let mut got = grad_buffers(&q, &k, &v, 0.0);
        let input = inputs_of(d, &q, &k, &v, None);
        backward(
            input,
            &f.idx,
            &f.probs,
            &d_out,
            Some(&d_w),
            grads(&mut got),
            Isa::detect(),
        )
        .unwrap();
        let h = 1e-6;
        for (which, grad) in [(0, &got.0), (1, &got.1), (2, &got.2)] {
            for i in (0..grad.len()).step_by(7) {
                let mut xs = [q.clone(), k.clone(), v.clone()];
                xs[which][i] += h;
                let up = loss(&xs[0], &xs[1], &xs[2]);
                xs[which][i] -= 2.0 * h;
                let down = loss(&xs[0], &xs[1], &xs[2]);
                let numeric = (up - down) / (2.0 * h);
                assert!(
                    (numeric - grad[i]).abs() < 1e-7,
                    "input {which} element {i}: {numeric} vs {}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = Rng(99);
        let d = dims(3, 100, 700, 16, 16);
        let (q, k, v) = inputs(d, &mut rng, Rng::unit);
        let (q, k, v) = (to_f32(&q), to_f32(&k), to_f32(&v));
        let d_out: Vec<f32> = (0..q.len()).map(|_| rng.unit() as f32).collect();
        let run = |threads| {
            with_threads(threads, || {
                let f = run_forward(d, &q, &k, &v, None, Isa::detect());
                let mut g = grad_buffers(&q, &k, &v, 0.0);
                let input = inputs_of(d, &q, &k, &v, None);
                backward(
                    input,
                    &f.idx,
                    &f.probs,
                    &d_out,
                    None,
                    grads(&mut g),
                    Isa::detect(),
                )
                .unwrap();
                (f.out, f.idx, f.probs, g)
            })
            .unwrap()
        };
        let one = run(1);
        assert!(one == run(2) && one == run(3));
    }

    #[test]
    fn bad_sizes_and_indices_are_errors() {
        let d = dims(1, 2, 8, 4, 3);
        let (q, k) = (vec![0.0f32; 8], vec![0.0f32; 32]);
        let mut f = Fwd {
            out: vec![0.0f32; 8],
            idx: vec![0i64; 6],
            probs: vec![0.0f32; 6],
        };
        let mut forward_with = |input| {
            let output = Selected {
                out: &mut f.out,
                idx: &mut f.idx,
                probs: &mut f.probs,
            };
            forward(input, output, Isa::detect())
                .unwrap_err()
                .to_string()
        };
        let err = forward_with(inputs_of(d, &q[..7], &k, &k, None));
        assert_eq!(err, "memory query: q has 7 elements, expected 8");
        for topk in [0, 9] {
            let err = forward_with(inputs_of(Dims { topk, ..d }, &q, &k, &k, None));
            assert!(err.contains("topk must be in [1, N=8]"));
        }
        let mut g = grad_buffers(&q, &k, &k, 0.0);
        let (idx, probs) = (vec![0, 1, 2, 3, 4, 8], vec![0.0f32; 6]);
        let input = inputs_of(d, &q, &k, &k, None);
        let err =
            backward(input, &idx, &probs, &q, None, grads(&mut g), Isa::detect()).unwrap_err();
        assert_eq!(err.to_string(), "memory query: index 8 out of range [0, 8)");
    }
}
