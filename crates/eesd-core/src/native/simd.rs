//! Element-wise helpers of the native decoder (softmax exponentials, SiLU, AXPY) in AVX-512,
//! AVX2 and scalar code that give identical bits: each is defined per element by IEEE
//! operations (fma, mul, add, div, round-to-nearest-even) in one order, and sums over a slice
//! use 16 lane accumulators and the tree of [`super::matmul::tree16`]. So nothing here depends
//! on how many rows are processed together, which the exactness of verification needs.

use super::matmul::{tree16, Isa, WKind};

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in few bits (Cephes' split of ln 2)
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;
// Cephes expf polynomial for exp(r) - 1 - r over |r| <= ln2 / 2.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes' 5.0000001e-1 rounds to 0.5 in f32
];

/// exp(x) for x clamped to [-87, 88] (the softmax and SiLU ranges), within 2 ulp. The
/// vector versions below compute exactly this.
#[inline]
pub fn exp_ref(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `xs[j] = exp(xs[j] - sub)`; returns the sum of the new values (lanes, then the tree).
pub fn exp_sum(isa: Isa, xs: &mut [f32], sub: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected as available.
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::exp_sum_512(xs, sub) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::exp_sum_256(xs, sub) },
        _ => exp_sum_scalar(xs, sub),
    }
}

fn exp_sum_scalar(xs: &mut [f32], sub: f32) -> f32 {
    let mut acc = [0f32; 16];
    for (c, chunk) in xs.chunks_mut(16).enumerate() {
        let _ = c;
        for (l, v) in chunk.iter_mut().enumerate() {
            *v = exp_ref(*v - sub);
            acc[l] += *v;
        }
    }
    tree16(&acc)
}

/// `out[i] = silu(gate[i]) * up[i]`, silu(g) = g / (1 + exp(-g)).
pub fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected as available; lengths checked above.
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::silu_mul_512(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::silu_mul_256(gate, up, out) },
        _ => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu_ref(g) * u;
            }
        }
    }
}

#[inline]
fn silu_ref(g: f32) -> f32 {
    g / (1.0 + exp_ref(-g))
}

/// Value rows of one KV head in the cache: `[*, hd]` elements of `kind` from `ptr`.
pub struct ValueRows {
    pub ptr: *const u8,
    pub kind: WKind,
    pub hd: usize,
}

/// Attention's weighted sum of value rows for several query rows at once:
/// `out[r, d] = sum_{j < lens[r]} p[r * p_stride + j] v[j, d]`, each element accumulated from
/// zero by one fma per position in position order: exactly [`axpy`] called for
/// `j = 0, 1, ...` on a zeroed row, so a query row gets the same bits alone or with others
/// (issue 7), however the rows are blocked.
///
/// A blocked [`weighted_rows`] kernel for some rows and a block of columns: `(out, first
/// column, p, p's row stride, the rows' lengths, the value rows)`.
#[cfg(target_arch = "x86_64")]
type BlockFn = unsafe fn(*mut f32, usize, &[f32], usize, &[usize], &ValueRows);

/// # Safety
/// `v` must hold `max(lens)` readable rows; `out` is `[lens.len(), hd]`.
pub unsafe fn weighted_rows(
    isa: Isa,
    out: &mut [f32],
    p: &[f32],
    p_stride: usize,
    lens: &[usize],
    v: &ValueRows,
) {
    let (rows, hd) = (lens.len(), v.hd);
    assert_eq!(out.len(), rows * hd, "out is [rows, hd]");
    for (r, &len) in lens.iter().enumerate() {
        assert!(len == 0 || r * p_stride + len <= p.len(), "p holds row {r}");
    }
    // The blocked kernels: (columns per call, the kernel for 1..=4 rows).
    #[cfg(target_arch = "x86_64")]
    let blocked: Option<(usize, [BlockFn; 4])> = match isa {
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => Some((
            64,
            [
                x86::weighted_rows_512::<1>,
                x86::weighted_rows_512::<2>,
                x86::weighted_rows_512::<3>,
                x86::weighted_rows_512::<4>,
            ],
        )),
        Isa::Avx2 => Some((
            16,
            [
                x86::weighted_rows_256::<1>,
                x86::weighted_rows_256::<2>,
                x86::weighted_rows_256::<3>,
                x86::weighted_rows_256::<4>,
            ],
        )),
        Isa::Scalar => None,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some((cols, kernels)) = blocked.filter(|(cols, _)| hd.is_multiple_of(*cols)) {
        let o = out.as_mut_ptr();
        for r0 in (0..rows).step_by(4) {
            let n = (rows - r0).min(4);
            let (ls, pr, o) = (&lens[r0..r0 + n], &p[r0 * p_stride..], o.add(r0 * hd));
            for col in (0..hd).step_by(cols) {
                kernels[n - 1](o, col, pr, p_stride, ls, v);
            }
        }
        return;
    }
    for (r, (o, &len)) in out.chunks_mut(hd).zip(lens).enumerate() {
        o.fill(0.0);
        for j in 0..len {
            let row = v.ptr.add(j * hd * v.kind.bytes());
            axpy(isa, o, p[r * p_stride + j], row, v.kind);
        }
    }
}

/// `acc[d] = fma(a, v[d], acc[d])` for a row `v` of `acc.len()` elements of `kind` (a value
/// row of the KV cache).
///
/// # Safety
/// `v` must point to `acc.len()` readable elements of `kind`.
pub unsafe fn axpy(isa: Isa, acc: &mut [f32], a: f32, v: *const u8, kind: WKind) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx if acc.len().is_multiple_of(16) => {
            x86::axpy_512(acc, a, v, kind)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if acc.len().is_multiple_of(16) => x86::axpy_256(acc, a, v, kind),
        _ => {
            for (d, o) in acc.iter_mut().enumerate() {
                *o = a.mul_add(load(v, kind, d), *o);
            }
        }
    }
}

/// Element `i` of a row of `kind`, widened to f32.
///
/// # Safety
/// `p` must point to more than `i` elements of `kind`.
#[inline]
pub unsafe fn load(p: *const u8, kind: WKind, i: usize) -> f32 {
    match kind {
        WKind::F32 => *(p as *const f32).add(i),
        WKind::Bf16 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
        WKind::F16 => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
    }
}

/// Writes `src` into a row of `kind` (round to nearest even, as torch's casts do).
///
/// # Safety
/// `dst` must point to `src.len()` writable elements of `kind`.
pub unsafe fn store(dst: *mut u8, kind: WKind, src: &[f32]) {
    match kind {
        WKind::F32 => std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut f32, src.len()),
        WKind::Bf16 => {
            for (i, v) in src.iter().enumerate() {
                *(dst as *mut u16).add(i) = half::bf16::from_f32(*v).to_bits();
            }
        }
        WKind::F16 => {
            for (i, v) in src.iter().enumerate() {
                *(dst as *mut u16).add(i) = half::f16::from_f32(*v).to_bits();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    // ---------------------------------------------------------------- AVX-512

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
            _mm512_set1_ps(EXP_HI),
        );
        let n = _mm512_roundscale_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let one = _mm512_set1_ps(1.0);
        let p = _mm512_fmadd_ps(p, r, one);
        let p = _mm512_fmadd_ps(p, r, one);
        let e = _mm512_slli_epi32(
            _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
            23,
        );
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_sum_512(xs: &mut [f32], sub: f32) -> f32 {
        let s = _mm512_set1_ps(sub);
        let mut acc = _mm512_setzero_ps();
        let full = xs.len() / 16 * 16;
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i < full {
            let e = exp_512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), s));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        for (l, v) in xs[full..].iter_mut().enumerate() {
            *v = exp_ref(*v - sub);
            lanes[l] += *v;
        }
        tree16(&lanes)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul_512(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let full = gate.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        let zero = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, exp_512(_mm512_sub_ps(zero, g))));
            let o = _mm512_mul_ps(s, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), o);
            i += 16;
        }
        for j in full..gate.len() {
            out[j] = silu_ref(gate[j]) * up[j];
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16_512(p: *const u8, kind: WKind, i: usize) -> __m512 {
        match kind {
            WKind::F32 => _mm512_loadu_ps((p as *const f32).add(i)),
            WKind::Bf16 => {
                let h = _mm256_loadu_si256((p as *const u16).add(i) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            WKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(
                (p as *const u16).add(i) as *const __m256i
            )),
        }
    }

    /// The blocked [`super::weighted_rows`] kernel for `R` rows (1..=4) and `C` vectors of
    /// columns from `col`: `C x R` accumulators stay in registers over every position (the
    /// per-position [`axpy`] round trip through memory was the latency bound of attention),
    /// each value chunk is loaded once for all R rows, and each element still takes one fma
    /// per position in order. One body for both vector widths; `$load` widens a value chunk.
    macro_rules! weighted_rows_kernel {
        ($(#[$doc:meta])* $name:ident, $feature:literal, $c:literal, $lanes:literal,
         $zero:ident, $set1:ident, $fma:ident, $store:ident, $load:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<const R: usize>(
                out: *mut f32,
                col: usize,
                p: &[f32],
                p_stride: usize,
                lens: &[usize],
                v: &ValueRows,
            ) {
                let (hd, kind) = (v.hd, v.kind);
                let mut acc = [[$zero(); $c]; R];
                let lo = lens[..R].iter().copied().min().unwrap_or(0);
                let hi = lens[..R].iter().copied().max().unwrap_or(0);
                let row = |j: usize| v.ptr.add((j * hd + col) * kind.bytes());
                for j in 0..lo {
                    let vr = row(j);
                    let mut vv = [$zero(); $c];
                    for (c, x) in vv.iter_mut().enumerate() {
                        *x = $load(vr, kind, $lanes * c);
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let pr = $set1(*p.get_unchecked(r * p_stride + j));
                        for c in 0..$c {
                            a[c] = $fma(pr, vv[c], a[c]);
                        }
                    }
                }
                for j in lo..hi {
                    let vr = row(j);
                    for (r, a) in acc.iter_mut().enumerate() {
                        if j < lens[r] {
                            let pr = $set1(*p.get_unchecked(r * p_stride + j));
                            for (c, ac) in a.iter_mut().enumerate() {
                                *ac = $fma(pr, $load(vr, kind, $lanes * c), *ac);
                            }
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (c, ac) in a.iter().enumerate() {
                        $store(out.add(r * hd + col + $lanes * c), *ac);
                    }
                }
            }
        };
    }

    weighted_rows_kernel!(
        /// 64 columns (4 x 16 lanes) on AVX-512.
        weighted_rows_512, "avx512f", 4, 16,
        _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, load16_512
    );

    weighted_rows_kernel!(
        /// 16 columns (2 x 8 lanes) on AVX2, 2 R of the 16 registers. Per-position [`axpy`]
        /// was a quarter of a long prompt's prefill there (a load and a store of every
        /// accumulator per position; 2,048 tokens, AVX2 forced on 2026-12-01's Intel host).
        weighted_rows_256, "avx2,fma,f16c", 2, 8,
        _mm256_setzero_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, load8_256
    );

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_512(acc: &mut [f32], a: f32, v: *const u8, kind: WKind) {
        let av = _mm512_set1_ps(a);
        let p = acc.as_mut_ptr();
        let mut i = 0;
        while i < acc.len() {
            let o = _mm512_fmadd_ps(av, load16_512(v, kind, i), _mm512_loadu_ps(p.add(i)));
            _mm512_storeu_ps(p.add(i), o);
            i += 16;
        }
    }

    // ---------------------------------------------------------------- AVX2

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn exp_256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
            _mm256_set1_ps(EXP_HI),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let one = _mm256_set1_ps(1.0);
        let p = _mm256_fmadd_ps(p, r, one);
        let p = _mm256_fmadd_ps(p, r, one);
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_sum_256(xs: &mut [f32], sub: f32) -> f32 {
        let s = _mm256_set1_ps(sub);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let full = xs.len() / 16 * 16;
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i < full {
            let a = exp_256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            let b = exp_256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), s));
            _mm256_storeu_ps(p.add(i), a);
            _mm256_storeu_ps(p.add(i + 8), b);
            lo = _mm256_add_ps(lo, a);
            hi = _mm256_add_ps(hi, b);
            i += 16;
        }
        let mut lanes = [0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
        for (l, v) in xs[full..].iter_mut().enumerate() {
            *v = exp_ref(*v - sub);
            lanes[l] += *v;
        }
        tree16(&lanes)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn silu_mul_256(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let full = gate.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, exp_256(_mm256_sub_ps(zero, g))));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
            i += 8;
        }
        for j in full..gate.len() {
            out[j] = silu_ref(gate[j]) * up[j];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8_256(p: *const u8, kind: WKind, i: usize) -> __m256 {
        match kind {
            WKind::F32 => _mm256_loadu_ps((p as *const f32).add(i)),
            WKind::Bf16 => {
                let h = _mm_loadu_si128((p as *const u16).add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            WKind::F16 => {
                _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_256(acc: &mut [f32], a: f32, v: *const u8, kind: WKind) {
        let av = _mm256_set1_ps(a);
        let p = acc.as_mut_ptr();
        let mut i = 0;
        while i < acc.len() {
            let o = _mm256_fmadd_ps(av, load8_256(v, kind, i), _mm256_loadu_ps(p.add(i)));
            _mm256_storeu_ps(p.add(i), o);
            i += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut x = -90.0f32;
        while x < 89.0 {
            let (got, want) = (exp_ref(x) as f64, (x.clamp(EXP_LO, EXP_HI) as f64).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }

    /// The blocked kernel equals per-position [`axpy`] bit for bit, for every row count and
    /// row lengths that differ (causal rows of one verify), in each value dtype.
    #[test]
    fn weighted_rows_equal_repeated_axpy() {
        let (hd, len) = (128, 77);
        let vals: Vec<f32> = (0..len * hd)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.013)
            .collect();
        let bf: Vec<u16> = vals
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect();
        let hf: Vec<u16> = vals
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect();
        let srcs: [(*const u8, WKind); 3] = [
            (vals.as_ptr() as *const u8, WKind::F32),
            (bf.as_ptr() as *const u8, WKind::Bf16),
            (hf.as_ptr() as *const u8, WKind::F16),
        ];
        let stride = len + 3;
        let p: Vec<f32> = (0..9 * stride)
            .map(|i| ((i * 31 % 97) as f32) / 97.0)
            .collect();
        for (v, kind) in srcs {
            for rows in 1..=9 {
                let lens: Vec<usize> = (0..rows).map(|r| len - 8 + r).collect();
                let mut want = vec![0f32; rows * hd];
                for r in 0..rows {
                    let o = &mut want[r * hd..][..hd];
                    for j in 0..lens[r] {
                        unsafe {
                            axpy(
                                Isa::Scalar,
                                o,
                                p[r * stride + j],
                                v.add(j * hd * kind.bytes()),
                                kind,
                            )
                        };
                    }
                }
                for isa in Isa::all_available() {
                    let mut got = vec![f32::NAN; rows * hd];
                    let rows_v = ValueRows { ptr: v, kind, hd };
                    unsafe { weighted_rows(isa, &mut got, &p, stride, &lens, &rows_v) };
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} {kind:?} {rows} rows"
                    );
                }
            }
        }
    }

    #[test]
    fn vector_paths_equal_the_scalar_definition() {
        let base: Vec<f32> = (0..203)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let mut want = base.clone();
        let want_sum = exp_sum(Isa::Scalar, &mut want, 1.5);
        let up: Vec<f32> = (0..203).map(|i| (i as f32 * 0.01) - 1.0).collect();
        let mut want_silu = vec![0f32; 203];
        silu_mul(Isa::Scalar, &base, &up, &mut want_silu);
        let v: Vec<u16> = (0..64)
            .map(|i| half::bf16::from_f32(i as f32 * 0.3 - 7.0).to_bits())
            .collect();
        let mut want_axpy: Vec<f32> = (0..64).map(|i| i as f32 * 0.001).collect();
        unsafe {
            axpy(
                Isa::Scalar,
                &mut want_axpy,
                0.37,
                v.as_ptr() as *const u8,
                WKind::Bf16,
            )
        };
        for isa in Isa::all_available() {
            let mut got = base.clone();
            let s = exp_sum(isa, &mut got, 1.5);
            assert_eq!(s.to_bits(), want_sum.to_bits(), "{isa:?} exp sum");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} exp"
            );
            let mut silu = vec![0f32; 203];
            silu_mul(isa, &base, &up, &mut silu);
            assert!(
                silu.iter()
                    .zip(&want_silu)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} silu"
            );
            let mut acc: Vec<f32> = (0..64).map(|i| i as f32 * 0.001).collect();
            unsafe { axpy(isa, &mut acc, 0.37, v.as_ptr() as *const u8, WKind::Bf16) };
            assert!(
                acc.iter()
                    .zip(&want_axpy)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} axpy"
            );
        }
    }
}
