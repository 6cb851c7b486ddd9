//! f32 and f16 weights on AVX-512: 16 f32 lanes of FMAs per chunk of 16, register blocks of
//! outputs by rows, and the short-row (attention) path that reduces 16 outputs at once.

#![allow(clippy::needless_range_loop)]

use super::*;

#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn load16_512<const K: u8>(row: *const u8, i: usize) -> __m512 {
    if K == F32 {
        _mm512_loadu_ps((row as *const f32).add(i))
    } else {
        _mm512_cvtph_ps(_mm256_loadu_si256(
            (row as *const u16).add(i) as *const __m256i
        ))
    }
}

/// Rows at most this long (attention's head size, not a weight matrix's) take blocks of 16
/// outputs reduced together by [`tree16x16`] when there are fewer than 4 rows; with more (a
/// prompt's queries), 4 x 4 blocks, whose 16 sums reduce together too and whose widened keys
/// serve 4 rows.
pub(super) const SHORT_K: usize = 128;

/// The module's tree over the 16 lanes of `v`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn tree_512(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    tree_256(_mm256_add_ps(lo, hi))
}

/// Lanes i and i+4, then i and i+2, then 0 and 1, of an 8-lane partial sum.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn tree_256(r8: __m256) -> f32 {
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
pub(super) unsafe fn tree16x16(a: &[__m512; 16]) -> __m512 {
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
pub(super) unsafe fn store_sums<const NO: usize, const NR: usize>(
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline(never)]
pub(super) unsafe fn block_512<const K: u8, const NO: usize, const NR: usize>(
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
    let pf = Prefetch::ahead(row0, NO * stride, full / 16, r0 == 0);
    let mut i = 0;
    let mut it = 0;
    while i < full {
        pf.issue(it);
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
        // Masked loads, not copies: a call here (memcpy) made LLVM keep accumulators on the
        // stack through the whole loop above.
        let lanes: __mmask16 = (1u16 << (k - full)) - 1;
        for (o, acc_o) in acc.iter_mut().enumerate() {
            let wv = load16_masked_512::<K>(row0.add(o * stride), full, lanes);
            for (r, a) in acc_o.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(lanes, x0.add(r * k + full));
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
        }
    }
    store_sums(&acc, y, w.n, r0, j);
}

/// [`load16_512`] of the `lanes` elements from `i` only, zeros in the others.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load16_masked_512<const K: u8>(row: *const u8, i: usize, lanes: __mmask16) -> __m512 {
    if K == F32 {
        _mm512_maskz_loadu_ps(lanes, (row as *const f32).add(i))
    } else {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            lanes,
            (row as *const u16).add(i) as *const i16,
        ))
    }
}

/// The `m` rows in [`row_blocks`] of at most [`MAX_ROWS_512`].
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn rows_512<const K: u8, const NO: usize>(
    x: &[f32],
    m: usize,
    w: &WeightView,
    j: usize,
    y: *mut f32,
) {
    for (r, nr) in row_blocks(m, MAX_ROWS_512) {
        match nr {
            5 => block_512::<K, NO, 5>(x, w, j, r, y),
            4 => block_512::<K, NO, 4>(x, w, j, r, y),
            3 => block_512::<K, NO, 3>(x, w, j, r, y),
            2 => block_512::<K, NO, 2>(x, w, j, r, y),
            _ => block_512::<K, NO, 1>(x, w, j, r, y),
        }
    }
}

/// Rows per register block of the f32 / f16 kernel: 4 outputs x 5 rows is 20 accumulators,
/// 4 weight vectors and a row's vector, within the 32 registers.
const MAX_ROWS_512: usize = 5;

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn range_512<const K: u8>(
    x: &[f32],
    m: usize,
    w: &WeightView,
    y: *mut f32,
    cols: std::ops::Range<usize>,
) {
    let mut j = cols.start;
    if w.k <= SHORT_K && m < 4 {
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
pub(in crate::native::matmul) unsafe fn range_avx512(
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
