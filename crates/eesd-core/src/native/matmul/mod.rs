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

use super::aligned::Aligned;
use super::pool::{split, Pool, SendPtr};

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
                    Isa::Avx512.available() && is_x86_feature_detected!("avx512bf16")
                }
                Isa::Avx512 => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                }
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

/// `src` (at most k values) rounded by [`to_bf16`] into `dst` as the emulation kernels read it:
/// per chunk of 32, the odd elements' values then the even elements', zero beyond `src`
/// (`dst` holds `src.len()` rounded up to 32 values).
pub fn split_scalar(src: &[f32], dst: &mut [f32]) {
    for (c, out) in dst.chunks_exact_mut(32).enumerate() {
        let v = |i: usize| src.get(32 * c + i).map_or(0.0, |&x| bf16_f32(to_bf16(x)));
        for l in 0..16 {
            out[l] = v(2 * l + 1);
            out[16 + l] = v(2 * l);
        }
    }
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

/// Rows of `x` prepared once per product for the kernels, each buffer 64-byte aligned
/// ([`Aligned`]): as given when already aligned (f32 / f16 weights; otherwise copied), or
/// rounded to bf16 and zero-padded to chunks of 32 (bf16 weights), plus for the bf16 emulation
/// (AVX2, AVX-512 without BF16) the same values widened to f32 as [odd elements, even
/// elements] per chunk.
struct Prepared<'a> {
    x: Rows<'a>,
    bf16: Aligned<u16>,
    split: Aligned<f32>,
    /// AMX B tiles: per group of 16 rows and chunk of 32, `[16 pairs][16 rows]` u32 pairs.
    tiles: Aligned<u32>,
    /// Row stride of `bf16` (k rounded up to 32); `split` has the same stride.
    kp: usize,
}

/// The f32 rows a kernel reads: the caller's, or an aligned copy of them.
enum Rows<'a> {
    Borrowed(&'a [f32]),
    Copied(Aligned<f32>),
}

impl Rows<'_> {
    fn get(&self) -> &[f32] {
        match self {
            Rows::Borrowed(x) => x,
            Rows::Copied(x) => x,
        }
    }
}

impl<'a> Prepared<'a> {
    fn new(isa: Isa, x: &'a [f32], m: usize, w: &WeightView) -> Self {
        let (k, kp) = (w.k, w.k.div_ceil(32) * 32);
        let bf16_weights = w.kind == WKind::Bf16 && isa != Isa::Scalar;
        // Rows of a multiple of 16 floats all start a line once the first does; other widths
        // (no LLaMA has one) are read as they are.
        let copy = !bf16_weights
            && isa != Isa::Scalar
            && k.is_multiple_of(16)
            && !(x.as_ptr() as usize).is_multiple_of(64);
        let rows = if copy {
            Rows::Copied(Aligned::from_slice(x))
        } else {
            Rows::Borrowed(x)
        };
        let (mut bf16, mut split) = (Aligned::zeroed(0), Aligned::zeroed(0));
        if bf16_weights && (isa == Isa::Avx2 || isa == Isa::Avx512) {
            // The emulation kernels read only the split rows.
            split = Aligned::zeroed(m * kp);
            for r in 0..m {
                let (src, dst) = (&x[r * k..(r + 1) * k], &mut split[r * kp..(r + 1) * kp]);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the instruction set was detected; dst has kp >= k elements.
                unsafe {
                    if isa == Isa::Avx512 {
                        x86::split_avx512(src, dst)
                    } else {
                        x86::split_avx2(src, dst)
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                split_scalar(src, dst);
            }
        } else if bf16_weights {
            bf16 = Aligned::zeroed(m * kp);
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
        }
        let mut tiles = Aligned::zeroed(0);
        if w.kind == WKind::Bf16 && isa == Isa::Amx {
            let chunks = kp / 32;
            tiles = Aligned::zeroed(m.div_ceil(16) * chunks * 256);
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
            x: rows,
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

/// Rows per pass over a thread's weights: a prompt's rows are taken in tiles of this many, so
/// a tile's prepared activations (at most a few hundred KB) stay in L2 while each block of
/// weights is read from L1 by all of them. A multiple of 16 (the AMX row groups). The tiling
/// only orders the work: every element is still the one definition of the module doc.
const ROW_TILE: usize = 64;

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
    let mut r0 = 0;
    while r0 < m {
        let rows = ROW_TILE.min(m - r0);
        let views = TileView {
            x: &p.x.get()[r0 * w.k..],
            bf16: p.bf16.get(r0 * p.kp..).unwrap_or(&[]),
            split: p.split.get(r0 * p.kp..).unwrap_or(&[]),
            tiles: p.tiles.get(r0 / 16 * (p.kp / 32) * 256..).unwrap_or(&[]),
            kp: p.kp,
        };
        run_tile(
            isa,
            &views,
            rows,
            w,
            SendPtr(y.0.add(r0 * w.n)),
            cols.clone(),
        );
        r0 += rows;
    }
}

/// One tile of rows of a [`Prepared`] (slices from the tile's first row).
struct TileView<'a> {
    x: &'a [f32],
    bf16: &'a [u16],
    split: &'a [f32],
    tiles: &'a [u32],
    kp: usize,
}

/// # Safety
/// As [`run_range`], for the tile's `m` rows.
unsafe fn run_tile(
    isa: Isa,
    p: &TileView,
    m: usize,
    w: &WeightView,
    y: SendPtr,
    cols: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let bf16 = w.kind == WKind::Bf16;
        match isa {
            Isa::Amx if bf16 => return x86::range_amx(p.tiles, p.bf16, p.kp, m, w, y.0, cols),
            Isa::Avx512Bf16 if bf16 => return x86::range_dp512(p.bf16, p.kp, m, w, y.0, cols),
            Isa::Avx512 if bf16 => return x86::range_em512(p.split, p.kp, m, w, y.0, cols),
            Isa::Avx2 if bf16 => return x86::range_dp256(p.split, p.kp, m, w, y.0, cols),
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

/// The measured multiply-add peak of this CPU for products with `kind` weights on `isa`, in
/// multiply-adds per second over all the pool's threads: f32 FMAs (f32 and f16 weights, and
/// bf16 weights where they are emulated), VDPBF16PS on AVX512-BF16 (and AMX, whose tile
/// rate is not measured here). Median of `reps` timed runs of independent chains.
pub fn peak_multiply_adds(pool: &Pool, isa: Isa, kind: WKind) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        let bf16_native = kind == WKind::Bf16 && matches!(isa, Isa::Avx512Bf16 | Isa::Amx);
        let (lanes, run): (usize, unsafe fn(usize) -> f32) = match isa {
            _ if bf16_native => (32, x86::peak::dpbf16_512),
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => (16, x86::peak::fma_512),
            Isa::Avx2 => (8, x86::peak::fma_256),
            Isa::Scalar => return 0.0,
        };
        let iters = 400_000;
        let sink = std::sync::atomic::AtomicU32::new(0);
        let pass = || {
            let t = std::time::Instant::now();
            pool.run(&|_| {
                // SAFETY: `isa` is available (the caller detected it).
                let v = unsafe { run(iters) };
                sink.fetch_xor(v.to_bits(), std::sync::atomic::Ordering::Relaxed);
            });
            t.elapsed().as_secs_f64()
        };
        pass();
        let mut times: Vec<f64> = (0..5).map(|_| pass()).collect();
        times.sort_by(|a, b| a.total_cmp(b));
        let ops = (x86::peak::per_iter(lanes) * iters * pool.threads()) as f64;
        ops / times[times.len() / 2]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pool, isa, kind);
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

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

    /// The vector rounding and split of the emulation kernels' rows gives the scalar
    /// definition's bits for every kind of value: ties either way, subnormals, signed zeros,
    /// infinities, NaNs, values that round up to infinity, and a ragged tail.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_split_equals_scalar() {
        let special = [
            0x0000_0000u32,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x0080_0000,
            0x3f80_8000, // a tie, even below: stays
            0x3f81_8000, // a tie, odd below: rounds up
            0x3f80_8001,
            0x7f7f_ffff, // rounds to infinity
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001, // a signalling NaN
            0xffff_ffff,
        ];
        let mut s = 12345u32;
        let src: Vec<f32> = (0..32 * 9 + 13)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                f32::from_bits(if i % 3 == 0 {
                    special[i / 3 % special.len()]
                } else {
                    s
                })
            })
            .collect();
        let kp = src.len().div_ceil(32) * 32;
        let mut want = vec![0f32; kp];
        split_scalar(&src, &mut want);
        for isa in [Isa::Avx512, Isa::Avx2] {
            if !isa.available() {
                continue;
            }
            let mut got = vec![f32::NAN; kp];
            // SAFETY: the instruction set is available; got holds kp >= src.len() values.
            unsafe {
                if isa == Isa::Avx512 {
                    x86::split_avx512(&src, &mut got)
                } else {
                    x86::split_avx2(&src, &mut got)
                }
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{isa:?} element {i}");
            }
        }
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

    /// A prompt's worth of rows (several row tiles and a ragged last one) gives each row the
    /// bits it gets alone, on every instruction set and weight dtype.
    #[test]
    fn many_rows_equal_each_row_alone() {
        let pool = Pool::new(2);
        let m = 2 * ROW_TILE + 7;
        for kind in [WKind::F32, WKind::Bf16, WKind::F16] {
            // (1100, 200): rows longer than attention's, and bf16 weights over two of the
            // AVX-512 emulation's L2 tiles of outputs.
            for (n, k) in [(40, 96), (33, 70), (1100, 200)] {
                let buf = weights(kind, n, k, (n + k) as u32);
                let w = unsafe { WeightView::new(buf.as_ptr(), kind, n, k) };
                let packed = (kind == WKind::Bf16 && n >= 16).then(|| AmxPacked::new(&w));
                let x = inputs(m, k);
                for isa in Isa::all_available() {
                    let wv = match (&packed, isa) {
                        (Some(p), Isa::Amx) => unsafe { w.with_packed(p) },
                        _ => w,
                    };
                    let mut y = vec![f32::NAN; m * n];
                    matmul(&pool, isa, &x, m, &wv, &mut y);
                    for r in 0..m {
                        let mut alone = vec![0f32; n];
                        matmul(&pool, isa, &x[r * k..(r + 1) * k], 1, &wv, &mut alone);
                        for j in 0..n {
                            assert_eq!(
                                y[r * n + j].to_bits(),
                                alone[j].to_bits(),
                                "{kind:?} {isa:?} n={n} k={k} row {r} col {j}"
                            );
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
