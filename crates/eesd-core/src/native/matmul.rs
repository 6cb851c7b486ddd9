//! `y = x W^T` for a few rows of `x`, with every output element computed in one fixed order.
//!
//! Why our own kernel (issues 7 and 8): speculative verification must give each row the same
//! bits as the single-row plain step, and torch's CPU kernels do not (f32 switches between a
//! matrix-vector and a GEMM kernel by row count; bf16 and f16 take other paths again). Here
//! element `(r, j)` is defined by the weight dtype alone:
//!
//! ```text
//! f32 / f16 weights (f32 activations), 16 lanes over chunks of 16:
//!   acc[l] = fma(W[j, 16c + l], x[r, 16c + l], acc[l])
//! bf16 weights (activations rounded to bf16, as AVX512-BF16's VDPBF16PS computes), 16 lanes
//! over chunks of 32, odd element first:
//!   acc[l] = fma(W[j, 32c + 2l + 1], xb[r, 32c + 2l + 1], acc[l])
//!   acc[l] = fma(W[j, 32c + 2l],     xb[r, 32c + 2l],     acc[l])
//! then y[r, j] = tree(acc)   (lanes l and l+8 first, then l and l+4, l and l+2, 0 and 1)
//! ```
//!
//! with the last chunk zero-padded, whatever the number of rows, the register blocking, the
//! thread split or the instruction set (AVX-512 with or without BF16, AVX2, scalar). So a row
//! computed alone or with 15 others has the same bits, and one weight pass serves every row
//! (the weights are streamed once, the rows stay in L1), which is what makes verifying k+1
//! positions cost little more than one. (Products of two bf16 values are exact in f32, so the
//! bf16 definition is also what VDPBF16PS does; its flushing of subnormals is the one
//! difference, and bf16 activations or weights below 1e-38 do not occur in practice.)
//!
//! Weights stay in the checkpoint's dtype and are read in place.

use super::pool::{split, Pool};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WKind {
    F32,
    Bf16,
    F16,
}

impl WKind {
    pub fn bytes(self) -> usize {
        match self {
            WKind::F32 => 4,
            WKind::Bf16 | WKind::F16 => 2,
        }
    }
}

/// A row-major `[n, k]` weight matrix in memory that outlives every use (a CPU tensor's
/// storage, kept alive by whoever made the view).
#[derive(Debug, Clone, Copy)]
pub struct WeightView {
    ptr: *const u8,
    pub kind: WKind,
    /// Output features (rows of W).
    pub n: usize,
    /// Input features (columns of W).
    pub k: usize,
    /// The same bf16 weights in AMX tile order ([`AmxPacked`]), or null.
    packed: *const u16,
}

// SAFETY: the view is read-only and its owner keeps the memory alive and unchanged while
// views exist (see `native::Linear`).
unsafe impl Send for WeightView {}
unsafe impl Sync for WeightView {}

impl WeightView {
    /// # Safety
    /// `ptr` must point to `n * k` contiguous elements of `kind` that stay valid and unchanged
    /// for the lifetime of the view and its copies.
    pub unsafe fn new(ptr: *const u8, kind: WKind, n: usize, k: usize) -> Self {
        WeightView {
            ptr,
            kind,
            n,
            k,
            packed: std::ptr::null(),
        }
    }

    /// The view with a tile-ordered copy for the AMX kernel (which reads it instead of the
    /// row-major weights for every full block of 16 outputs).
    ///
    /// # Safety
    /// `packed` must hold [`AmxPacked::new`] of these weights and outlive the view.
    pub unsafe fn with_packed(mut self, packed: &AmxPacked) -> Self {
        self.packed = packed.tiles.as_ptr() as *const u16;
        self
    }

    /// Element `(j, i)` widened to f32 (the scalar path and tests).
    #[inline]
    pub fn get(&self, j: usize, i: usize) -> f32 {
        let idx = j * self.k + i;
        // SAFETY: in bounds by the constructor's contract and the callers' loops.
        unsafe {
            match self.kind {
                WKind::F32 => *(self.ptr as *const f32).add(idx),
                WKind::Bf16 => f32::from_bits((*(self.ptr as *const u16).add(idx) as u32) << 16),
                WKind::F16 => half::f16::from_bits(*(self.ptr as *const u16).add(idx)).to_f32(),
            }
        }
    }

    fn row_ptr(&self, j: usize) -> *const u8 {
        // SAFETY: j < n, so the row is inside the allocation.
        unsafe { self.ptr.add(j * self.k * self.kind.bytes()) }
    }
}

/// bf16 weights rearranged for AMX: for each block of 16 outputs and each chunk of 32 inputs,
/// one 16 x 32 tile (1 KB) contiguous, blocks in order. The kernel then streams the weights
/// sequentially; reading 16-row tiles straight from row-major weights touches 16 far-apart
/// lines per load and ran 25% slower for one row. A second copy of the weights: the torch
/// tensors stay for prefill and training.
pub struct AmxPacked {
    tiles: Vec<[u16; 512]>,
}

impl AmxPacked {
    /// Packs the full 16-output blocks of `w` (bf16); the last `n % 16` outputs are not packed
    /// (the kernel reads them row-major).
    pub fn new(w: &WeightView) -> Self {
        assert_eq!(w.kind, WKind::Bf16, "AMX tiles hold bf16 weights");
        let chunks = w.k.div_ceil(32);
        let blocks = w.n / 16;
        let mut tiles = vec![[0u16; 512]; blocks * chunks];
        let src = w.ptr as *const u16;
        for b in 0..blocks {
            for c in 0..chunks {
                let t = &mut tiles[b * chunks + c];
                for i in 0..16 {
                    for e in 0..32.min(w.k - 32 * c) {
                        // SAFETY: (16b + i, 32c + e) is inside the n x k matrix.
                        t[32 * i + e] = unsafe { *src.add((16 * b + i) * w.k + 32 * c + e) };
                    }
                }
            }
        }
        AmxPacked { tiles }
    }
}

/// Which instruction set runs the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX512-BF16 plus AMX tiles: bf16 weights by TDPBF16PS (1-16 rows in one weight pass at
    /// memory speed); other dtypes as [`Isa::Avx512Bf16`].
    Amx,
    /// AVX-512F plus AVX512-BF16 (VDPBF16PS for bf16 weights).
    Avx512Bf16,
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The best this CPU supports (`EESD_ISA=avx512bf16|avx512|avx2|scalar` forces a lower
    /// one).
    pub fn detect() -> Isa {
        let forced = std::env::var("EESD_ISA").ok();
        let order = [
            Isa::Amx,
            Isa::Avx512Bf16,
            Isa::Avx512,
            Isa::Avx2,
            Isa::Scalar,
        ];
        let start = match forced.as_deref() {
            Some("avx512bf16") => 1,
            Some("avx512") => 2,
            Some("avx2") => 3,
            Some("scalar") => 4,
            _ => 0,
        };
        order[start..]
            .iter()
            .copied()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU can run, best first (tests compare them all).
    pub fn all_available() -> Vec<Isa> {
        [
            Isa::Amx,
            Isa::Avx512Bf16,
            Isa::Avx512,
            Isa::Avx2,
            Isa::Scalar,
        ]
        .into_iter()
        .filter(|i| i.available())
        .collect()
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Amx => Isa::Avx512Bf16.available() && x86::amx_ready(),
                Isa::Avx512Bf16 => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bf16")
                }
                Isa::Avx512 => avx2 && is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => avx2,
                Isa::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// The fixed reduction of 16 lane sums (see the module docs).
#[inline]
pub fn tree16(a: &[f32; 16]) -> f32 {
    let mut r8 = [0f32; 8];
    for i in 0..8 {
        r8[i] = a[i] + a[i + 8];
    }
    let r4 = [r8[0] + r8[4], r8[1] + r8[5], r8[2] + r8[6], r8[3] + r8[7]];
    let r2 = [r4[0] + r4[2], r4[1] + r4[3]];
    r2[0] + r2[1]
}

/// An activation rounded to bf16 for the bf16-weight product: nearest even, with subnormal
/// inputs taken as (signed) zero, which is what VCVTNEPS2BF16 computes (the AVX512-BF16 path
/// converts 16 at a time with it) and never gives VDPBF16PS a subnormal to flush.
#[inline]
pub fn to_bf16(v: f32) -> u16 {
    if v.to_bits() & 0x7f80_0000 == 0 {
        return (v.to_bits() >> 16) as u16 & 0x8000;
    }
    half::bf16::from_f32(v).to_bits()
}

#[inline]
fn bf16_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The reference for one element, `sum_i W[j, i] x[i]` in the dtype's fixed order.
pub fn dot_scalar(w: &WeightView, j: usize, x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    if w.kind == WKind::Bf16 {
        let xb = |i: usize| {
            if i < w.k {
                bf16_f32(to_bf16(x[i]))
            } else {
                0.0
            }
        };
        let wv = |i: usize| if i < w.k { w.get(j, i) } else { 0.0 };
        for c in 0..w.k.div_ceil(32) {
            for (l, a) in acc.iter_mut().enumerate() {
                let (odd, even) = (32 * c + 2 * l + 1, 32 * c + 2 * l);
                *a = wv(odd).mul_add(xb(odd), *a);
                *a = wv(even).mul_add(xb(even), *a);
            }
        }
    } else {
        for c in 0..w.k.div_ceil(16) {
            for (l, a) in acc.iter_mut().enumerate() {
                let i = 16 * c + l;
                let (wv, xv) = if i < w.k {
                    (w.get(j, i), x[i])
                } else {
                    (0.0, 0.0)
                };
                *a = wv.mul_add(xv, *a);
            }
        }
    }
    tree16(&acc)
}

/// Rows of `x` prepared once per product for the kernels: as given (f32 / f16 weights), or
/// rounded to bf16 and zero-padded to chunks of 32 (bf16 weights), plus for the AVX2 bf16
/// path the same values widened to f32 as [odd elements, even elements] per chunk.
struct Prepared<'a> {
    x: &'a [f32],
    bf16: Vec<u16>,
    split: Vec<f32>,
    /// AMX B tiles: per group of 16 rows and chunk of 32, `[16 pairs][16 rows]` u32 pairs.
    tiles: Vec<u32>,
    /// Row stride of `bf16` (k rounded up to 32); `split` has the same stride.
    kp: usize,
}

impl<'a> Prepared<'a> {
    fn new(isa: Isa, x: &'a [f32], m: usize, w: &WeightView) -> Self {
        let (k, kp) = (w.k, w.k.div_ceil(32) * 32);
        let (mut bf16, mut split) = (Vec::new(), Vec::new());
        if w.kind == WKind::Bf16 && isa != Isa::Scalar {
            bf16 = vec![0u16; m * kp];
            for r in 0..m {
                let (dst, src) = (&mut bf16[r * kp..r * kp + k], &x[r * k..(r + 1) * k]);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Bf16 || isa == Isa::Amx {
                    // SAFETY: the instruction set was detected; the slices have equal lengths.
                    unsafe { x86::to_bf16_avx512(src, dst) };
                    continue;
                }
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = to_bf16(*s);
                }
            }
            if isa == Isa::Avx2 || isa == Isa::Avx512 {
                split = vec![0f32; m * kp];
                for r in 0..m {
                    for c in 0..kp / 32 {
                        let src = &bf16[r * kp + 32 * c..][..32];
                        let dst = &mut split[r * kp + 32 * c..][..32];
                        for l in 0..16 {
                            dst[l] = bf16_f32(src[2 * l + 1]);
                            dst[16 + l] = bf16_f32(src[2 * l]);
                        }
                    }
                }
            }
        }
        let mut tiles = Vec::new();
        if w.kind == WKind::Bf16 && isa == Isa::Amx {
            let chunks = kp / 32;
            tiles = vec![0u32; m.div_ceil(16) * chunks * 256];
            for r in 0..m {
                let (g, rr) = (r / 16, r % 16);
                for c in 0..chunks {
                    let t = &mut tiles[(g * chunks + c) * 256..][..256];
                    let src = &bf16[r * kp + 32 * c..][..32];
                    for p in 0..16 {
                        t[p * 16 + rr] = src[2 * p] as u32 | (src[2 * p + 1] as u32) << 16;
                    }
                }
            }
        }
        Prepared {
            x,
            bf16,
            split,
            tiles,
            kp,
        }
    }
}

/// `y[r, j] = sum_i W[j, i] x[r, i]` for `m` rows: `x` is `[m, k]`, `y` is `[m, n]`, both
/// row-major. Outputs are split over the pool's threads.
pub fn matmul(pool: &Pool, isa: Isa, x: &[f32], m: usize, w: &WeightView, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(y.len(), m * n, "y is [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let prep = Prepared::new(isa, x, m, w);
    let yp = SendPtr(y.as_mut_ptr());
    let threads = pool.threads();
    // Small products are not worth a second thread's start-up (a few microseconds).
    let parts = if (n * k) < 64 * 1024 { 1 } else { threads };
    let job = |tid: usize| {
        if tid >= parts {
            return;
        }
        let range = split(n, parts, 16, tid);
        // SAFETY: each thread writes only columns `range` of y, disjoint across threads.
        unsafe { run_range(isa, &prep, m, w, yp, range) };
    };
    if parts == 1 {
        job(0);
    } else {
        pool.run(&job);
    }
}

/// [`matmul`] on the calling thread only (inside another parallel region).
pub fn matmul_single(isa: Isa, x: &[f32], m: usize, w: &WeightView, y: &mut [f32]) {
    assert_eq!(x.len(), m * w.k, "x is [m, k]");
    assert_eq!(y.len(), m * w.n, "y is [m, n]");
    let prep = Prepared::new(isa, x, m, w);
    // SAFETY: this thread owns all of y.
    unsafe { run_range(isa, &prep, m, w, SendPtr(y.as_mut_ptr()), 0..w.n) };
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// # Safety
/// `y` must be `[m, w.n]` and no other thread may write columns `cols` meanwhile.
unsafe fn run_range(
    isa: Isa,
    p: &Prepared,
    m: usize,
    w: &WeightView,
    y: SendPtr,
    cols: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = w.kind == WKind::Bf16;
        match isa {
            Isa::Amx if bf16 => return x86::range_amx(&p.tiles, &p.bf16, p.kp, m, w, y.0, cols),
            Isa::Avx512Bf16 if bf16 => return x86::range_dp512(&p.bf16, p.kp, m, w, y.0, cols),
            Isa::Avx512 | Isa::Avx2 if bf16 => {
                return x86::range_dp256(&p.split, p.kp, m, w, y.0, cols)
            }
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => {
                return x86::range_avx512(p.x, m, w, y.0, cols)
            }
            Isa::Avx2 => return x86::range_avx2(p.x, m, w, y.0, cols),
            Isa::Scalar => {}
        }
    }
    for j in cols {
        for r in 0..m {
            *y.0.add(r * w.n + j) = dot_scalar(w, j, &p.x[r * w.k..(r + 1) * w.k]);
        }
    }
}

// Register-blocked loops index several arrays with the same counters; iterators would hide it.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{WKind, WeightView};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Copies a tail chunk (fewer than 16 elements from `i`) of row `j` into a zero-padded
    /// f32 buffer; tails are rare (no LLaMA dimension has one) so this need not be fast.
    fn tail_w(w: &WeightView, j: usize, i: usize) -> [f32; 16] {
        let mut b = [0f32; 16];
        for (l, v) in b.iter_mut().enumerate().take(w.k - i) {
            *v = w.get(j, i + l);
        }
        b
    }

    fn tail_x(x: &[f32], i: usize) -> [f32; 16] {
        let mut b = [0f32; 16];
        b[..x.len() - i].copy_from_slice(&x[i..]);
        b
    }

    /// Where to prefetch while a block of `bytes` bytes from `row0` is computed in `iters`
    /// iterations: the next block, spread evenly (cache lines per iteration). Prefetching past
    /// the end of the matrix is harmless (prefetches never fault).
    #[inline]
    fn prefetch_plan(row0: *const u8, bytes: usize, iters: usize) -> (*const u8, usize) {
        let lines = bytes.div_ceil(64);
        (row0.wrapping_add(bytes), lines.div_ceil(iters.max(1)))
    }

    // The FMA kernels' weight dtypes as const generics, so the inner loops carry no dtype
    // branch (bf16 weights always take the VDPBF16PS / AMX kernels below).
    const F32: u8 = 0;
    const F16: u8 = 2;

    fn code(kind: WKind) -> u8 {
        match kind {
            WKind::F32 => F32,
            WKind::Bf16 => unreachable!("bf16 weights take the bf16 kernels"),
            WKind::F16 => F16,
        }
    }

    // ---------------------------------------------------------------- AVX-512

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16_512<const K: u8>(row: *const u8, i: usize) -> __m512 {
        if K == F32 {
            _mm512_loadu_ps((row as *const f32).add(i))
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                (row as *const u16).add(i) as *const __m256i
            ))
        }
    }

    /// Rows at most this long (attention's head size, not a weight matrix's) take blocks of 16
    /// outputs reduced together by [`tree16x16`].
    const SHORT_K: usize = 128;

    /// The module's tree over the 16 lanes of `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tree_512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        tree_256(_mm256_add_ps(lo, hi))
    }

    /// Lanes i and i+4, then i and i+2, then 0 and 1, of an 8-lane partial sum.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tree_256(r8: __m256) -> f32 {
        let r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
        let r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
        _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)))
    }

    /// [`tree_512`] of 16 vectors at once: output `o` is the tree of `a[o]`, bit for bit (each
    /// step adds the same lane pairs, (l, l+8), (l, l+4), (l, l+2), (0, 1), of all 16 sums
    /// packed into as few vectors as hold them). 45 shuffles and adds for 16 outputs instead of
    /// about 9 instructions each: where rows are short (attention scores over a 64-wide head),
    /// the reduction, not the dot product, was most of the work.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tree16x16(a: &[__m512; 16]) -> __m512 {
        // Lanes l and l+8: vector i holds the 8 partial sums of a[2i] then of a[2i+1].
        let mut b = [_mm512_setzero_ps(); 8];
        for (i, v) in b.iter_mut().enumerate() {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            *v = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            );
        }
        // Lanes l and l+4: vector i holds quarters a[4i], a[4i+1], a[4i+2], a[4i+3].
        let mut c = [_mm512_setzero_ps(); 4];
        for (i, v) in c.iter_mut().enumerate() {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            *v = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            );
        }
        // Lanes l and l+2: quarter q of vector i holds a[8i+q] (2 lanes), then a[8i+4+q].
        let mut d = [_mm512_setzero_ps(); 2];
        for (i, v) in d.iter_mut().enumerate() {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            *v = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
            );
        }
        // Lanes 0 and 1: lane 4q + t holds output q + 4t; put them in order.
        let e = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(idx, e)
    }

    /// Writes the tree of each accumulator, `acc[o][r]` to `y[r0 + r, j + o]`: 16 at a time
    /// through [`tree16x16`], the rest one by one (the same bits either way).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_sums<const NO: usize, const NR: usize>(
        acc: &[[__m512; NR]; NO],
        y: *mut f32,
        n: usize,
        r0: usize,
        j: usize,
    ) {
        let at = |g: usize| (r0 + g % NR) * n + j + g / NR;
        if NO == 16 && NR == 1 {
            let mut a = [_mm512_setzero_ps(); 16];
            for (v, acc_o) in a.iter_mut().zip(acc) {
                *v = acc_o[0];
            }
            _mm512_storeu_ps(y.add(at(0)), tree16x16(&a));
            return;
        }
        let mut g0 = 0;
        while g0 + 16 <= NO * NR {
            let mut a = [_mm512_setzero_ps(); 16];
            for (i, v) in a.iter_mut().enumerate() {
                *v = acc[(g0 + i) / NR][(g0 + i) % NR];
            }
            let mut sums = [0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), tree16x16(&a));
            for (i, s) in sums.iter().enumerate() {
                *y.add(at(g0 + i)) = *s;
            }
            g0 += 16;
        }
        for g in g0..NO * NR {
            *y.add(at(g)) = tree_512(acc[g / NR][g % NR]);
        }
    }

    /// NO consecutive outputs from `j` times NR rows from `r0`. No closures here: they would
    /// not inherit the target features, and every intrinsic would become a call.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block_512<const K: u8, const NO: usize, const NR: usize>(
        x: &[f32],
        w: &WeightView,
        j: usize,
        r0: usize,
        y: *mut f32,
    ) {
        let k = w.k;
        let full = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); NR]; NO];
        let row0 = w.row_ptr(j);
        let stride = k * w.kind.bytes();
        let x0 = x.as_ptr().add(r0 * k);
        // The block's NO rows are one contiguous region, but too short (a few KB) for the
        // hardware prefetcher to find: fetch the next block while this one computes.
        let (pf, pf_lines) = prefetch_plan(row0, NO * stride, full / 16);
        let mut i = 0;
        let mut it = 0;
        while i < full {
            for l in 0..pf_lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.add((it * pf_lines + l) * 64) as *const i8);
            }
            it += 1;
            let mut wv = [_mm512_setzero_ps(); NO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = load16_512::<K>(row0.add(o * stride), i);
            }
            for r in 0..NR {
                let xv = _mm512_loadu_ps(x0.add(r * k + i));
                for o in 0..NO {
                    acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                }
            }
            i += 16;
        }
        if full < k {
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let wt = tail_w(w, j + o, full);
                let wv = _mm512_loadu_ps(wt.as_ptr());
                for (r, a) in acc_o.iter_mut().enumerate() {
                    let xt = tail_x(&x[(r0 + r) * k..(r0 + r + 1) * k], full);
                    *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xt.as_ptr()), *a);
                }
            }
        }
        store_sums(&acc, y, w.n, r0, j);
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows_512<const K: u8, const NO: usize>(
        x: &[f32],
        m: usize,
        w: &WeightView,
        j: usize,
        y: *mut f32,
    ) {
        let mut r = 0;
        while r + 4 <= m {
            block_512::<K, NO, 4>(x, w, j, r, y);
            r += 4;
        }
        match m - r {
            3 => block_512::<K, NO, 3>(x, w, j, r, y),
            2 => block_512::<K, NO, 2>(x, w, j, r, y),
            1 => block_512::<K, NO, 1>(x, w, j, r, y),
            _ => {}
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn range_512<const K: u8>(
        x: &[f32],
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        if w.k <= SHORT_K {
            while j + 16 <= cols.end {
                for r in 0..m {
                    block_512::<K, 16, 1>(x, w, j, r, y);
                }
                j += 16;
            }
        }
        if m == 1 {
            // One row: more outputs per block keep enough FMA chains in flight.
            while j + 8 <= cols.end {
                block_512::<K, 8, 1>(x, w, j, 0, y);
                j += 8;
            }
        }
        while j + 4 <= cols.end {
            rows_512::<K, 4>(x, m, w, j, y);
            j += 4;
        }
        while j < cols.end {
            rows_512::<K, 1>(x, m, w, j, y);
            j += 1;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn range_avx512(
        x: &[f32],
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        match code(w.kind) {
            F32 => range_512::<F32>(x, m, w, y, cols),
            _ => range_512::<F16>(x, m, w, y, cols),
        }
    }

    // ---------------------------------------------------------------- bf16 weights

    /// [`super::to_bf16`] of every element, 16 at a time by VCVTNEPS2BF16. A SmolLM2 pass
    /// rounds 150k activations per row: 0.10 ms one by one, 0.012 ms this way (a one-off
    /// measurement on 2026-11-30's host; about 0.7% of a step per row).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
        let full = src.len() / 16 * 16;
        for i in (0..full).step_by(16) {
            let b: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
        for (d, s) in dst[full..].iter_mut().zip(&src[full..]) {
            *d = super::to_bf16(*s);
        }
    }

    /// Row `j`'s chunk of 32 bf16 weights at element `i` as a vector; a zero-padded copy for
    /// the tail chunk (fewer than 32 elements left).
    #[inline]
    fn w32_tail(w: &WeightView, j: usize, i: usize) -> [u16; 32] {
        let mut b = [0u16; 32];
        for (l, v) in b.iter_mut().enumerate().take(w.k - i) {
            // SAFETY: (j, i + l) is inside the matrix.
            *v = unsafe { *(w.row_ptr(j) as *const u16).add(i + l) };
        }
        b
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block_dp512<const NO: usize, const NR: usize>(
        xb: &[u16],
        kp: usize,
        w: &WeightView,
        j: usize,
        r0: usize,
        y: *mut f32,
    ) {
        let k = w.k;
        let full = k / 32 * 32;
        let mut acc = [[_mm512_setzero_ps(); NR]; NO];
        let row0 = w.row_ptr(j);
        let stride = k * 2;
        let x0 = xb.as_ptr().add(r0 * kp);
        let (pf, pf_lines) = prefetch_plan(row0, NO * stride, full / 32);
        let mut i = 0;
        let mut it = 0;
        while i < full {
            for l in 0..pf_lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.add((it * pf_lines + l) * 64) as *const i8);
            }
            it += 1;
            let mut wv = [_mm512_setzero_si512(); NO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(row0.add(o * stride + 2 * i) as *const __m512i);
            }
            for r in 0..NR {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(x0.add(r * kp + i) as *const __m512i));
                for o in 0..NO {
                    acc[o][r] = _mm512_dpbf16_ps(
                        acc[o][r],
                        std::mem::transmute::<__m512i, __m512bh>(wv[o]),
                        xv,
                    );
                }
            }
            i += 32;
        }
        if full < k {
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let wt = w32_tail(w, j + o, full);
                let wv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(wt.as_ptr() as *const __m512i));
                for (r, a) in acc_o.iter_mut().enumerate() {
                    let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                        x0.add(r * kp + full) as *const __m512i,
                    ));
                    *a = _mm512_dpbf16_ps(*a, wv, xv);
                }
            }
        }
        store_sums(&acc, y, w.n, r0, j);
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn rows_dp512<const NO: usize>(
        xb: &[u16],
        kp: usize,
        m: usize,
        w: &WeightView,
        j: usize,
        y: *mut f32,
    ) {
        let mut r = 0;
        while r + 6 <= m {
            block_dp512::<NO, 6>(xb, kp, w, j, r, y);
            r += 6;
        }
        match m - r {
            5 => block_dp512::<NO, 5>(xb, kp, w, j, r, y),
            4 => block_dp512::<NO, 4>(xb, kp, w, j, r, y),
            3 => block_dp512::<NO, 3>(xb, kp, w, j, r, y),
            2 => block_dp512::<NO, 2>(xb, kp, w, j, r, y),
            1 => block_dp512::<NO, 1>(xb, kp, w, j, r, y),
            _ => {}
        }
    }

    /// bf16 weights with VDPBF16PS; `xb` holds the rows rounded to bf16, stride `kp`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn range_dp512(
        xb: &[u16],
        kp: usize,
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        if w.k <= SHORT_K {
            while j + 16 <= cols.end {
                for r in 0..m {
                    block_dp512::<16, 1>(xb, kp, w, j, r, y);
                }
                j += 16;
            }
        }
        if m <= 2 {
            while j + 8 <= cols.end {
                match m {
                    1 => block_dp512::<8, 1>(xb, kp, w, j, 0, y),
                    _ => block_dp512::<8, 2>(xb, kp, w, j, 0, y),
                }
                j += 8;
            }
        }
        while j + 4 <= cols.end {
            rows_dp512::<4>(xb, kp, m, w, j, y);
            j += 4;
        }
        while j < cols.end {
            rows_dp512::<1>(xb, kp, m, w, j, y);
            j += 1;
        }
    }

    /// The same bf16 definition on AVX2: per chunk of 32, the weights' odd and even elements
    /// widened to f32 (a mask and a shift of each 16-element load) against `xs`, the rows
    /// pre-split as [odd elements, even elements], odd first.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_dp256<const NO: usize, const NR: usize>(
        xs: &[f32],
        kp: usize,
        w: &WeightView,
        j: usize,
        r0: usize,
        y: *mut f32,
    ) {
        let k = w.k;
        let full = k / 32 * 32;
        let z = _mm256_setzero_ps();
        let mut lo = [[z; NR]; NO];
        let mut hi = [[z; NR]; NO];
        let row0 = w.row_ptr(j);
        let stride = k * 2;
        let x0 = xs.as_ptr().add(r0 * kp);
        let mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let (pf, pf_lines) = prefetch_plan(row0, NO * stride, full / 32);
        let chunks = k.div_ceil(32);
        for c in 0..chunks {
            if c * 32 < full {
                for l in 0..pf_lines {
                    _mm_prefetch::<_MM_HINT_T0>(pf.add((c * pf_lines + l) * 64) as *const i8);
                }
            }
            // (odd, even) halves: lanes 0-7 from elements 0-15, lanes 8-15 from 16-31.
            let mut wv = [(z, z, z, z); NO];
            for (o, v) in wv.iter_mut().enumerate() {
                let (a, b) = if c * 32 < full {
                    let p = row0.add(o * stride + 64 * c) as *const __m256i;
                    (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
                } else {
                    let t = w32_tail(w, j + o, full);
                    let p = t.as_ptr() as *const __m256i;
                    (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
                };
                *v = (
                    _mm256_castsi256_ps(_mm256_and_si256(a, mask)),
                    _mm256_castsi256_ps(_mm256_and_si256(b, mask)),
                    _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                    _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                );
            }
            for r in 0..NR {
                let xr = x0.add(r * kp + 32 * c);
                let (xol, xoh) = (_mm256_loadu_ps(xr), _mm256_loadu_ps(xr.add(8)));
                let (xel, xeh) = (_mm256_loadu_ps(xr.add(16)), _mm256_loadu_ps(xr.add(24)));
                for o in 0..NO {
                    lo[o][r] = _mm256_fmadd_ps(wv[o].0, xol, lo[o][r]);
                    hi[o][r] = _mm256_fmadd_ps(wv[o].1, xoh, hi[o][r]);
                    lo[o][r] = _mm256_fmadd_ps(wv[o].2, xel, lo[o][r]);
                    hi[o][r] = _mm256_fmadd_ps(wv[o].3, xeh, hi[o][r]);
                }
            }
        }
        for o in 0..NO {
            for r in 0..NR {
                *y.add((r0 + r) * w.n + j + o) = tree_256(_mm256_add_ps(lo[o][r], hi[o][r]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn range_dp256(
        xs: &[f32],
        kp: usize,
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        while j + 2 <= cols.end {
            let mut r = 0;
            while r + 2 <= m {
                block_dp256::<2, 2>(xs, kp, w, j, r, y);
                r += 2;
            }
            if r < m {
                block_dp256::<2, 1>(xs, kp, w, j, r, y);
            }
            j += 2;
        }
        while j < cols.end {
            for r in 0..m {
                block_dp256::<1, 1>(xs, kp, w, j, r, y);
            }
            j += 1;
        }
    }

    // ---------------------------------------------------------------- AMX (bf16 weights)

    extern "C" {
        fn syscall(num: i64, ...) -> i64;
    }

    /// CPUID says AMX-BF16 and AMX-TILE, and Linux granted this process the tile state
    /// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per process.
    pub(super) fn amx_ready() -> bool {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller).
            let r = __cpuid_count(7, 0);
            if (r.edx >> 22) & 1 == 0 || (r.edx >> 24) & 1 == 0 {
                return false;
            }
            const SYS_ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            // SAFETY: a plain system call with integer arguments.
            unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }

    /// Tile configuration: tmm0-3 C (16 rows x 16 f32), tmm4-5 A (16 outputs x 32 bf16),
    /// tmm6 B (16 pairs x 16 rows); every tile is 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    impl TileCfg {
        fn new() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1; // palette 1
            for t in 0..7 {
                c[16 + 2 * t] = 64;
                c[48 + t] = 16;
            }
            TileCfg(c)
        }
    }

    /// `C[i][r] += sum over the chunk of A[i][..] . x[r][..]` for 16-output blocks: the weights
    /// go straight from memory into A tiles (stride = row length); each element's sum depends
    /// only on its own weight row and activation row, so rows are batch-invariant.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn range_amx(
        tiles: &[u32],
        xb: &[u16],
        kp: usize,
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        let k = w.k;
        let chunks = kp / 32;
        let full = k / 32;
        let stride = k * 2;
        let cfg = TileCfg::new();
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
        let mut cbuf = [0f32; 256];
        let mut tail = [0u16; 16 * 32];
        let blocks_end = cols.start + (cols.end - cols.start) / 16 * 16;
        for g in 0..m.div_ceil(16) {
            let rows = (m - 16 * g).min(16);
            let b0 = tiles.as_ptr().add(g * chunks * 256);
            let mut j = cols.start;
            while j < blocks_end {
                // Up to four 16-output blocks share each B tile.
                let nb = ((blocks_end - j) / 16).min(4);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                );
                for c in 0..chunks {
                    asm!("tileloadd tmm6, [{}+{}*1]", in(reg) b0.add(c * 256), in(reg) 64usize, options(nostack));
                    for b in 0..nb {
                        let rowp = w.row_ptr(j + 16 * b);
                        let (ap, astride) = if !w.packed.is_null() {
                            let tile = w.packed.add((((j / 16) + b) * chunks + c) * 512);
                            if g == 0 {
                                // Four tiles ahead in this block's sequential stream.
                                for l in 0..16 {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        (tile as *const u8).wrapping_add(4096 + 64 * l)
                                            as *const i8,
                                    );
                                }
                            }
                            (tile as *const u8, 64)
                        } else if c < full {
                            // The next 64 outputs' lines of this chunk, one block ahead.
                            if g == 0 {
                                for i in 0..16 {
                                    _mm_prefetch::<_MM_HINT_T0>(
                                        rowp.wrapping_add((64 + i) * stride + 64 * c) as *const i8,
                                    );
                                }
                            }
                            (rowp.add(64 * c), stride)
                        } else {
                            for i in 0..16 {
                                let t = w32_tail(w, j + 16 * b + i, 32 * c);
                                tail[32 * i..32 * i + 32].copy_from_slice(&t);
                            }
                            (tail.as_ptr() as *const u8, 64)
                        };
                        match b {
                            0 => {
                                asm!("tileloadd tmm4, [{}+{}*1]", "tdpbf16ps tmm0, tmm4, tmm6", in(reg) ap, in(reg) astride, options(nostack))
                            }
                            1 => {
                                asm!("tileloadd tmm5, [{}+{}*1]", "tdpbf16ps tmm1, tmm5, tmm6", in(reg) ap, in(reg) astride, options(nostack))
                            }
                            2 => {
                                asm!("tileloadd tmm4, [{}+{}*1]", "tdpbf16ps tmm2, tmm4, tmm6", in(reg) ap, in(reg) astride, options(nostack))
                            }
                            _ => {
                                asm!("tileloadd tmm5, [{}+{}*1]", "tdpbf16ps tmm3, tmm5, tmm6", in(reg) ap, in(reg) astride, options(nostack))
                            }
                        }
                    }
                }
                for b in 0..nb {
                    let cp = cbuf.as_mut_ptr();
                    match b {
                        0 => {
                            asm!("tilestored [{}+{}*1], tmm0", in(reg) cp, in(reg) 64usize, options(nostack))
                        }
                        1 => {
                            asm!("tilestored [{}+{}*1], tmm1", in(reg) cp, in(reg) 64usize, options(nostack))
                        }
                        2 => {
                            asm!("tilestored [{}+{}*1], tmm2", in(reg) cp, in(reg) 64usize, options(nostack))
                        }
                        _ => {
                            asm!("tilestored [{}+{}*1], tmm3", in(reg) cp, in(reg) 64usize, options(nostack))
                        }
                    }
                    for i in 0..16 {
                        for r in 0..rows {
                            *y.add((16 * g + r) * w.n + j + 16 * b + i) = cbuf[16 * i + r];
                        }
                    }
                }
                j += 16 * nb;
            }
        }
        asm!("tilerelease", options(nostack));
        // Fewer than 16 outputs left at the end of the matrix: the VDPBF16PS kernel (a fixed
        // choice per output column, so still the same bits for any number of rows).
        if blocks_end < cols.end {
            range_dp512(xb, kp, m, w, y, blocks_end..cols.end);
        }
    }

    // ---------------------------------------------------------------- AVX2

    /// 16 elements as two 8-lane halves (lanes 0-7, 8-15).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load16_256<const K: u8>(row: *const u8, i: usize) -> (__m256, __m256) {
        if K == F32 {
            let p = (row as *const f32).add(i);
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        } else {
            let p = (row as *const u16).add(i) as *const __m128i;
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_256<const K: u8, const NO: usize, const NR: usize>(
        x: &[f32],
        w: &WeightView,
        j: usize,
        r0: usize,
        y: *mut f32,
    ) {
        let k = w.k;
        let full = k / 16 * 16;
        let z = _mm256_setzero_ps();
        let mut lo = [[z; NR]; NO];
        let mut hi = [[z; NR]; NO];
        let row0 = w.row_ptr(j);
        let stride = k * w.kind.bytes();
        let x0 = x.as_ptr().add(r0 * k);
        let (pf, pf_lines) = prefetch_plan(row0, NO * stride, full / 16);
        let mut i = 0;
        let mut it = 0;
        while i < full {
            for l in 0..pf_lines {
                _mm_prefetch::<_MM_HINT_T0>(pf.add((it * pf_lines + l) * 64) as *const i8);
            }
            it += 1;
            let mut wv = [(z, z); NO];
            for (o, v) in wv.iter_mut().enumerate() {
                *v = load16_256::<K>(row0.add(o * stride), i);
            }
            for r in 0..NR {
                let xl = _mm256_loadu_ps(x0.add(r * k + i));
                let xh = _mm256_loadu_ps(x0.add(r * k + i + 8));
                for o in 0..NO {
                    lo[o][r] = _mm256_fmadd_ps(wv[o].0, xl, lo[o][r]);
                    hi[o][r] = _mm256_fmadd_ps(wv[o].1, xh, hi[o][r]);
                }
            }
            i += 16;
        }
        if full < k {
            for o in 0..NO {
                let wt = tail_w(w, j + o, full);
                for r in 0..NR {
                    let xt = tail_x(&x[(r0 + r) * k..(r0 + r + 1) * k], full);
                    lo[o][r] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(wt.as_ptr()),
                        _mm256_loadu_ps(xt.as_ptr()),
                        lo[o][r],
                    );
                    hi[o][r] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(wt.as_ptr().add(8)),
                        _mm256_loadu_ps(xt.as_ptr().add(8)),
                        hi[o][r],
                    );
                }
            }
        }
        for o in 0..NO {
            for r in 0..NR {
                *y.add((r0 + r) * w.n + j + o) = tree_256(_mm256_add_ps(lo[o][r], hi[o][r]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_256<const K: u8, const NO: usize>(
        x: &[f32],
        m: usize,
        w: &WeightView,
        j: usize,
        y: *mut f32,
    ) {
        let mut r = 0;
        while r + 2 <= m {
            block_256::<K, NO, 2>(x, w, j, r, y);
            r += 2;
        }
        if r < m {
            block_256::<K, NO, 1>(x, w, j, r, y);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn range_256<const K: u8>(
        x: &[f32],
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        let mut j = cols.start;
        if m == 1 {
            while j + 4 <= cols.end {
                block_256::<K, 4, 1>(x, w, j, 0, y);
                j += 4;
            }
        }
        while j + 2 <= cols.end {
            rows_256::<K, 2>(x, m, w, j, y);
            j += 2;
        }
        while j < cols.end {
            rows_256::<K, 1>(x, m, w, j, y);
            j += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn range_avx2(
        x: &[f32],
        m: usize,
        w: &WeightView,
        y: *mut f32,
        cols: std::ops::Range<usize>,
    ) {
        match code(w.kind) {
            F32 => range_256::<F32>(x, m, w, y, cols),
            _ => range_256::<F16>(x, m, w, y, cols),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(kind: WKind, n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        let vals: Vec<f32> = (0..n * k).map(|_| next() * 0.1).collect();
        match kind {
            WKind::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WKind::Bf16 => vals
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            WKind::F16 => vals
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        }
    }

    fn inputs(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect()
    }

    /// Every row of a 1..=16-row product equals the same row computed alone, bit for bit, on
    /// every instruction set, and equals the scalar reference; odd sizes exercise the tails.
    #[test]
    fn rows_are_batch_invariant_and_isa_independent() {
        let pool = Pool::new(2);
        for kind in [WKind::F32, WKind::Bf16, WKind::F16] {
            for (n, k) in [
                (37, 45),
                (64, 576),
                (200, 96),
                (13, 16),
                (1000, 130),
                (517, 64),
            ] {
                let buf = weights(kind, n, k, (n * k) as u32);
                let w = unsafe { WeightView::new(buf.as_ptr(), kind, n, k) };
                let x = inputs(16, k);
                let reference: Vec<f32> = (0..16)
                    .flat_map(|r| (0..n).map(move |j| (r, j)))
                    .map(|(r, j)| dot_scalar(&w, j, &x[r * k..(r + 1) * k]))
                    .collect();
                // AMX reads bf16 weights either row-major or tile-ordered (what the model
                // uses); both must give the same bits.
                let packed = (kind == WKind::Bf16 && n >= 16).then(|| AmxPacked::new(&w));
                let mut paths: Vec<(Isa, WeightView)> =
                    Isa::all_available().into_iter().map(|i| (i, w)).collect();
                if let (Some(p), true) = (&packed, Isa::Amx.available()) {
                    paths.push((Isa::Amx, unsafe { w.with_packed(p) }));
                }
                let mut amx_bits: Option<Vec<f32>> = None;
                for (isa, wv) in paths {
                    let mut alone = vec![0f32; 16 * n];
                    for r in 0..16 {
                        matmul(
                            &pool,
                            isa,
                            &x[r * k..(r + 1) * k],
                            1,
                            &wv,
                            &mut alone[r * n..(r + 1) * n],
                        );
                    }
                    if isa == Isa::Amx && kind == WKind::Bf16 {
                        match &amx_bits {
                            None => amx_bits = Some(alone.clone()),
                            Some(a) => assert!(
                                a.iter()
                                    .zip(&alone)
                                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                                "AMX packed and row-major weights differ (n={n} k={k})"
                            ),
                        }
                    }
                    for m in 1..=16 {
                        let mut y = vec![f32::NAN; m * n];
                        matmul(&pool, isa, &x[..m * k], m, &wv, &mut y);
                        for r in 0..m {
                            for j in 0..n {
                                let (got, at) = (y[r * n + j], r * n + j);
                                let what =
                                    format!("{kind:?} {isa:?} n={n} k={k} m={m} row {r} col {j}");
                                assert_eq!(
                                    got.to_bits(),
                                    alone[at].to_bits(),
                                    "batch invariance: {what}"
                                );
                                if isa == Isa::Amx && kind == WKind::Bf16 && j < n / 16 * 16 {
                                    // TDPBF16PS's internal order is not documented: only close.
                                    let scale: f32 =
                                        (0..k).map(|i| (w.get(j, i) * x[r * k + i]).abs()).sum();
                                    assert!(
                                        (got - reference[at]).abs() <= 1e-5 * scale + 1e-30,
                                        "{what}: {got} vs {}",
                                        reference[at]
                                    );
                                } else {
                                    assert_eq!(
                                        got.to_bits(),
                                        reference[at].to_bits(),
                                        "definition: {what}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_a_plain_dot_product() {
        let pool = Pool::new(1);
        let (n, k) = (8, 100);
        let buf = weights(WKind::F32, n, k, 3);
        let w = unsafe { WeightView::new(buf.as_ptr(), WKind::F32, n, k) };
        let x = inputs(1, k);
        let mut y = vec![0f32; n];
        matmul(&pool, Isa::detect(), &x, 1, &w, &mut y);
        for (j, yj) in y.iter().enumerate() {
            let want: f64 = (0..k).map(|i| w.get(j, i) as f64 * x[i] as f64).sum();
            assert!(
                (*yj as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{yj} vs {want}"
            );
        }
    }

    /// The vector rounding to bf16 equals the scalar one on every class of value: the
    /// subnormals on both sides of the smallest normal, ties, NaN, infinities, overflow.
    #[test]
    fn vector_bf16_rounding_equals_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512Bf16.available() {
            let mut v: Vec<f32> = vec![
                0.0,
                -0.0,
                1e-39,
                -1e-39,
                f32::from_bits(0x007f_ffff),
                f32::from_bits(0x807f_ffff),
                f32::MIN_POSITIVE,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                1.003_906_2,
                1.011_718_8,
                -2.5,
            ];
            v.extend(inputs(1, 1000));
            v.extend((0..2000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
            let mut got = vec![0u16; v.len()];
            unsafe { x86::to_bf16_avx512(&v, &mut got) };
            for (x, g) in v.iter().zip(&got) {
                assert_eq!(*g, to_bf16(*x), "{x:e} ({:08x})", x.to_bits());
            }
        }
    }
}
