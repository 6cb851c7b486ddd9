//! f32 and f16 weights on AVX2: two 8-lane halves per chunk of 16, the same order as AVX-512.

#![allow(clippy::needless_range_loop)]

use super::*;

/// 16 elements as two 8-lane halves (lanes 0-7, 8-15).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn load16_256<const K: u8>(row: *const u8, i: usize) -> (__m256, __m256) {
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

/// [`load16_256`] of the `rem` elements from `i` only, zeros after them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tail16_256<const K: u8>(row: *const u8, i: usize, rem: usize) -> (__m256, __m256) {
    if K == F32 {
        let t = tail::<f32, 16>((row as *const f32).add(i), rem);
        (
            _mm256_loadu_ps(t.as_ptr()),
            _mm256_loadu_ps(t.as_ptr().add(8)),
        )
    } else {
        let t = tail::<u16, 16>((row as *const u16).add(i), rem);
        let p = t.as_ptr() as *const __m128i;
        (
            _mm256_cvtph_ps(_mm_loadu_si128(p)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
        )
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn block_256<const K: u8, const NO: usize, const NR: usize>(
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
    let pf = Prefetch::ahead(row0, NO * stride, full / 16, r0 == 0);
    let mut i = 0;
    let mut it = 0;
    while i < full {
        pf.issue(it);
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
        let rem = k - full;
        for o in 0..NO {
            let (wl, wh) = tail16_256::<K>(row0.add(o * stride), full, rem);
            for r in 0..NR {
                let xt = tail::<f32, 16>(x0.add(r * k + full), rem);
                lo[o][r] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xt.as_ptr()), lo[o][r]);
                hi[o][r] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xt.as_ptr().add(8)), hi[o][r]);
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
pub(super) unsafe fn rows_256<const K: u8, const NO: usize>(
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
pub(super) unsafe fn range_256<const K: u8>(
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
pub(in crate::native::matmul) unsafe fn range_avx2(
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
