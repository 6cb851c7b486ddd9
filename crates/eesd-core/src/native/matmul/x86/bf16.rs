//! bf16 weights: VDPBF16PS on AVX512-BF16, and its bit-exact emulation with f32 FMAs on AVX2
//! (and AVX-512 without BF16), plus the activations' rounding to bf16.

#![allow(clippy::needless_range_loop)]

use super::*;

/// [`crate::native::matmul::to_bf16`] of every element, 16 at a time by VCVTNEPS2BF16. A SmolLM2 pass
/// rounds 150k activations per row: 0.10 ms one by one, 0.012 ms this way (a one-off
/// measurement on 2026-11-30's host; about 0.7% of a step per row).
#[target_feature(enable = "avx512f,avx512bf16")]
pub(in crate::native::matmul) unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
    let full = src.len() / 16 * 16;
    for i in (0..full).step_by(16) {
        let b: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(b),
        );
    }
    for (d, s) in dst[full..].iter_mut().zip(&src[full..]) {
        *d = crate::native::matmul::to_bf16(*s);
    }
}

/// One row for the bf16 emulation kernels: `src` (k values) rounded as
/// [`crate::native::matmul::to_bf16`] does, widened back to f32, and laid out per chunk of 32
/// as [odd elements, even elements] into `dst` (k rounded up to 32, zeroed beyond k). Vector
/// code for the full chunks: the scalar rounding took about 2 ns an element, 8% of a 9-row
/// pass, on one thread while the others waited.
#[target_feature(enable = "avx512f")]
pub(in crate::native::matmul) unsafe fn split_avx512(src: &[f32], dst: &mut [f32]) {
    let full = src.len() / 32 * 32;
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for c in (0..full).step_by(32) {
        let a = round_bf16_512(_mm512_loadu_si512(src.as_ptr().add(c) as *const __m512i));
        let b = round_bf16_512(_mm512_loadu_si512(
            src.as_ptr().add(c + 16) as *const __m512i
        ));
        let d = dst.as_mut_ptr().add(c) as *mut __m512i;
        _mm512_storeu_si512(d, _mm512_permutex2var_epi32(a, odd, b));
        _mm512_storeu_si512(d.add(1), _mm512_permutex2var_epi32(a, even, b));
    }
    crate::native::matmul::split_scalar(&src[full..], &mut dst[full..]);
}

/// [`crate::native::matmul::to_bf16`] of 16 f32 bit patterns, as f32 bit patterns (the bf16
/// in the high half): nearest even, subnormals to signed zero, NaNs quieted as the `half`
/// crate does.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn round_bf16_512(bits: __m512i) -> __m512i {
    let exp = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f80_0000));
    let tiny = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
    let abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut out = _mm512_and_si512(rounded, hi);
    out = _mm512_mask_mov_epi32(
        out,
        tiny,
        _mm512_and_si512(bits, _mm512_set1_epi32(0x8000_0000u32 as i32)),
    );
    let quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), hi);
    _mm512_mask_mov_epi32(out, nan, quiet)
}

/// [`split_avx512`] on AVX2.
#[target_feature(enable = "avx2")]
pub(in crate::native::matmul) unsafe fn split_avx2(src: &[f32], dst: &mut [f32]) {
    let full = src.len() / 32 * 32;
    // Within each 8-lane vector: odd elements to the low half, even to the high half.
    let idx = _mm256_setr_epi32(1, 3, 5, 7, 0, 2, 4, 6);
    for c in (0..full).step_by(32) {
        let mut p = [_mm256_setzero_si256(); 4];
        for (q, v) in p.iter_mut().enumerate() {
            let x = _mm256_loadu_si256(src.as_ptr().add(c + 8 * q) as *const __m256i);
            *v = _mm256_permutevar8x32_epi32(round_bf16_256(x), idx);
        }
        let d = dst.as_mut_ptr().add(c) as *mut __m256i;
        _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x20>(p[0], p[1]));
        _mm256_storeu_si256(d.add(1), _mm256_permute2x128_si256::<0x20>(p[2], p[3]));
        _mm256_storeu_si256(d.add(2), _mm256_permute2x128_si256::<0x31>(p[0], p[1]));
        _mm256_storeu_si256(d.add(3), _mm256_permute2x128_si256::<0x31>(p[2], p[3]));
    }
    crate::native::matmul::split_scalar(&src[full..], &mut dst[full..]);
}

/// [`round_bf16_512`] on 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn round_bf16_256(bits: __m256i) -> __m256i {
    let exp = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f80_0000));
    let tiny = _mm256_cmpeq_epi32(exp, _mm256_setzero_si256());
    let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
    let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let mut out = _mm256_and_si256(rounded, hi);
    let signed_zero = _mm256_and_si256(bits, _mm256_set1_epi32(0x8000_0000u32 as i32));
    out = _mm256_blendv_epi8(out, signed_zero, tiny);
    let quiet = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000)), hi);
    _mm256_blendv_epi8(out, quiet, nan)
}

/// Row `j`'s chunk of 32 bf16 weights at element `i` (fewer than 32 left), zero-padded.
#[inline(always)]
pub(super) unsafe fn w32_tail(w: &WeightView, j: usize, i: usize) -> [u16; 32] {
    tail::<u16, 32>((w.row_ptr(j) as *const u16).add(i), w.k - i)
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline(never)]
pub(super) unsafe fn block_dp512<const NO: usize, const NR: usize>(
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
    let pf = Prefetch::ahead(row0, NO * stride, full / 32, r0 == 0);
    let mut i = 0;
    let mut it = 0;
    while i < full {
        pf.issue(it);
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
        // A masked load, not a copy (a call here kept accumulators on the stack).
        let lanes: __mmask32 = (1u32 << (k - full)) - 1;
        for (o, acc_o) in acc.iter_mut().enumerate() {
            let wt = _mm512_maskz_loadu_epi16(lanes, row0.add(o * stride + 2 * full) as *const i16);
            let wv: __m512bh = std::mem::transmute(wt);
            for (r, a) in acc_o.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    x0.add(r * kp + full) as *const __m512i
                ));
                *a = _mm512_dpbf16_ps(*a, wv, xv);
            }
        }
    }
    store_sums(&acc, y, w.n, r0, j);
}

#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(super) unsafe fn rows_dp512<const NO: usize>(
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
pub(in crate::native::matmul) unsafe fn range_dp512(
    xb: &[u16],
    kp: usize,
    m: usize,
    w: &WeightView,
    y: *mut f32,
    cols: std::ops::Range<usize>,
) {
    let mut j = cols.start;
    if w.k <= SHORT_K && m < 4 {
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
#[inline(never)]
pub(super) unsafe fn block_dp256<const NO: usize, const NR: usize>(
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
    let pf = Prefetch::ahead(row0, NO * stride, full / 32, r0 == 0);
    for c in 0..full / 32 {
        pf.issue(c);
        let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); NO];
        for (o, v) in wv.iter_mut().enumerate() {
            let p = row0.add(o * stride + 64 * c) as *const __m256i;
            *v = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
        }
        dp256_chunk(&mut lo, &mut hi, &wv, x0.add(32 * c), kp);
    }
    // The tail after the loop, from a zero-padded copy (inlined, no call).
    if full < k {
        let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); NO];
        for (o, v) in wv.iter_mut().enumerate() {
            let t = w32_tail(w, j + o, full);
            let p = t.as_ptr() as *const __m256i;
            *v = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
        }
        dp256_chunk(&mut lo, &mut hi, &wv, x0.add(full), kp);
    }
    for o in 0..NO {
        for r in 0..NR {
            *y.add((r0 + r) * w.n + j + o) = tree_256(_mm256_add_ps(lo[o][r], hi[o][r]));
        }
    }
}

/// One chunk of 32 of [`block_dp256`]: `wv[o]` holds output o's 32 bf16 weights as two
/// 16-element halves, `xr` the first row's split chunk (the next rows `kp` apart).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dp256_chunk<const NO: usize, const NR: usize>(
    lo: &mut [[__m256; NR]; NO],
    hi: &mut [[__m256; NR]; NO],
    wv: &[(__m256i, __m256i); NO],
    xr: *const f32,
    kp: usize,
) {
    let mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
    // (odd, even) halves: lanes 0-7 from elements 0-15, lanes 8-15 from 16-31.
    let mut ww = [(
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    ); NO];
    for (o, (a, b)) in wv.iter().enumerate() {
        ww[o] = (
            _mm256_castsi256_ps(_mm256_and_si256(*a, mask)),
            _mm256_castsi256_ps(_mm256_and_si256(*b, mask)),
            _mm256_castsi256_ps(_mm256_slli_epi32(*a, 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(*b, 16)),
        );
    }
    for r in 0..NR {
        let xr = xr.add(r * kp);
        let (xol, xoh) = (_mm256_loadu_ps(xr), _mm256_loadu_ps(xr.add(8)));
        let (xel, xeh) = (_mm256_loadu_ps(xr.add(16)), _mm256_loadu_ps(xr.add(24)));
        for o in 0..NO {
            lo[o][r] = _mm256_fmadd_ps(ww[o].0, xol, lo[o][r]);
            hi[o][r] = _mm256_fmadd_ps(ww[o].1, xoh, hi[o][r]);
            lo[o][r] = _mm256_fmadd_ps(ww[o].2, xel, lo[o][r]);
            hi[o][r] = _mm256_fmadd_ps(ww[o].3, xeh, hi[o][r]);
        }
    }
}

/// One output's sums for `NR` rows on AVX2 in two passes over its weights: lanes 0-7 of the
/// module's 16 (the first 16 elements of every chunk) over all of k, then lanes 8-15 (the
/// weights, one row of them, now in L1). Each pass holds only `NR` accumulators, so up to 12
/// rows fit the 16 registers with the widened weights; the rows are read as memory operands
/// of the FMAs. [`block_dp256`] holds both halves of every (output, row) pair and the
/// widened weights of both, and spilled from 2 x 2 up. (AVX2 forced on 2026-12-01's Intel
/// host, whole passes of the model's products: 5 rows x1.69 -> x1.5, 9 rows x2.56 -> x2.3-2.5
/// of one row; weights in L2, 9 rows reach 29 G multiply-adds/s a core, 65% of the FMA peak.
/// 1-3 rows keep [`block_dp256`], which streams at the memory's rate.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn block_dp256_rows<const NR: usize>(
    xs: &[f32],
    kp: usize,
    w: &WeightView,
    j: usize,
    r0: usize,
    y: *mut f32,
) {
    let k = w.k;
    let full = k / 32 * 32;
    let row = w.row_ptr(j);
    let xs = &xs[r0 * kp..];
    let y = y.add(r0 * w.n);
    let mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
    // Both passes read this row; the first block of rows keeps the stream ahead by
    // prefetching 8 rows on, into L2 (the later blocks read the tile from L2).
    let pf = Prefetch {
        from: row.wrapping_add(DP256_PREFETCH_ROWS * 2 * k),
        lines: if r0 == 0 {
            (2 * k).div_ceil(64).div_ceil((full / 32).max(1))
        } else {
            0
        },
        far: true,
    };
    let tail = if full < k {
        w32_tail(w, j, full)
    } else {
        [0u16; 32]
    };
    let mut halves = [[_mm256_setzero_ps(); NR]; 2];
    for (half, acc) in halves.iter_mut().enumerate() {
        let fmas = |acc: &mut [__m256; NR], wv: __m256i, c: usize| {
            let wo = _mm256_castsi256_ps(_mm256_and_si256(wv, mask));
            let we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let x = xs.as_ptr().add(r * kp + c + 8 * half);
                *a = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x), *a);
                *a = _mm256_fmadd_ps(we, _mm256_loadu_ps(x.add(16)), *a);
            }
        };
        for c in (0..full).step_by(32) {
            if half == 0 {
                pf.issue(c / 32);
            }
            let wv = _mm256_loadu_si256(row.add(2 * c + 32 * half) as *const __m256i);
            fmas(acc, wv, c);
        }
        if full < k {
            let wv = _mm256_loadu_si256(tail.as_ptr().add(16 * half) as *const __m256i);
            fmas(acc, wv, full);
        }
    }
    for r in 0..NR {
        *y.add(r * w.n + j) = tree_256(_mm256_add_ps(halves[0][r], halves[1][r]));
    }
}

/// How far ahead (in weight rows) [`block_dp256_rows`] prefetches.
const DP256_PREFETCH_ROWS: usize = 8;

/// [`block_dp256_rows`] for `nr` (1 to 12) rows from `r0`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dp256_rows_n(
    xs: &[f32],
    kp: usize,
    nr: usize,
    w: &WeightView,
    j: usize,
    r0: usize,
    y: *mut f32,
) {
    match nr {
        1 => block_dp256_rows::<1>(xs, kp, w, j, r0, y),
        2 => block_dp256_rows::<2>(xs, kp, w, j, r0, y),
        3 => block_dp256_rows::<3>(xs, kp, w, j, r0, y),
        4 => block_dp256_rows::<4>(xs, kp, w, j, r0, y),
        5 => block_dp256_rows::<5>(xs, kp, w, j, r0, y),
        6 => block_dp256_rows::<6>(xs, kp, w, j, r0, y),
        7 => block_dp256_rows::<7>(xs, kp, w, j, r0, y),
        8 => block_dp256_rows::<8>(xs, kp, w, j, r0, y),
        9 => block_dp256_rows::<9>(xs, kp, w, j, r0, y),
        10 => block_dp256_rows::<10>(xs, kp, w, j, r0, y),
        11 => block_dp256_rows::<11>(xs, kp, w, j, r0, y),
        12 => block_dp256_rows::<12>(xs, kp, w, j, r0, y),
        _ => unreachable!("blocks of 1 to 12 rows"),
    }
}

/// The rows one [`block_dp256_rows`] block may hold: all fit 16 registers up to 12, and
/// their split activations (4 bytes an element) must stay in L1 beside the weights, since
/// every output reads all of them: 24 KB of a 32-48 KB L1.
fn dp256_block_rows(kp: usize) -> usize {
    (24 * 1024 / (4 * kp)).clamp(4, 12)
}

/// The weights (bytes) every block of rows runs over before the next block starts, when
/// the rows take several blocks: in L2 (512 KB on the AVX2 hosts with the smallest) for all
/// blocks after the first.
const DP256_TILE_BYTES: usize = 192 * 1024;

#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::native::matmul) unsafe fn range_dp256(
    xs: &[f32],
    kp: usize,
    m: usize,
    w: &WeightView,
    y: *mut f32,
    cols: std::ops::Range<usize>,
) {
    let mut j = cols.start;
    if m >= 4 {
        let blocks: Vec<(usize, usize)> = row_blocks(m, dp256_block_rows(kp)).collect();
        let tile = if blocks.len() == 1 {
            cols.len()
        } else {
            (DP256_TILE_BYTES / (2 * w.k)).max(1)
        };
        let mut t0 = cols.start;
        while t0 < cols.end {
            let t1 = (t0 + tile).min(cols.end);
            for &(r, nr) in &blocks {
                for j in t0..t1 {
                    block_dp256_rows_n(xs, kp, nr, w, j, r, y);
                }
            }
            t0 = t1;
        }
        return;
    }
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

/// The bf16 definition on AVX-512 without AVX512-BF16: one 32-element load per weight row and
/// chunk, its odd elements (a mask) and even elements (a shift) widened to 16 f32 lanes, against
/// `xs` pre-split as [odd elements, even elements]; odd first, as VDPBF16PS. Half the
/// instructions of the AVX2 kernel per lane, and the widened weights serve `NR` rows.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline(never)]
pub(super) unsafe fn block_em512<const NO: usize, const NR: usize>(
    xs: &[f32],
    kp: usize,
    w: &WeightView,
    j: usize,
    r0: usize,
    y: *mut f32,
    pf: Prefetch,
) {
    let k = w.k;
    let full = k / 32 * 32;
    let mut acc = [[_mm512_setzero_ps(); NO]; NR];
    let row0 = w.row_ptr(j);
    let stride = k * 2;
    let x0 = xs.as_ptr().add(r0 * kp);
    let mut i = 0;
    let mut it = 0;
    // The full chunks in a loop of their own: with the tail's copies inside it, the loop
    // kept its accumulators in memory and ran at a third of the FMA rate.
    while i < full {
        pf.issue(it);
        it += 1;
        let mut wv = [_mm512_setzero_si512(); NO];
        for (o, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(row0.add(o * stride + 2 * i) as *const __m512i);
        }
        em512_chunk(&mut acc, &wv, x0.add(i), kp);
        i += 32;
    }
    if full < k {
        // A masked load, not a copy: a call here (memcpy) made LLVM keep a third of the
        // accumulators on the stack through the whole loop above.
        let lanes: __mmask32 = (1u32 << (k - full)) - 1;
        let mut wv = [_mm512_setzero_si512(); NO];
        for (o, v) in wv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_epi16(lanes, row0.add(o * stride + 2 * full) as *const i16);
        }
        em512_chunk(&mut acc, &wv, x0.add(full), kp);
    }
    let mut sums = [[_mm512_setzero_ps(); NR]; NO];
    for (r, a) in acc.iter().enumerate() {
        for (o, v) in a.iter().enumerate() {
            sums[o][r] = *v;
        }
    }
    store_sums(&sums, y, w.n, r0, j);
}

/// One chunk of 32 of [`block_em512`]: `wv[o]` holds output o's 32 bf16 weights, `xr` the
/// first row's split chunk (the next rows `kp` apart).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn em512_chunk<const NO: usize, const NR: usize>(
    acc: &mut [[__m512; NO]; NR],
    wv: &[__m512i; NO],
    xr: *const f32,
    kp: usize,
) {
    let mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let mut wo = [_mm512_setzero_ps(); NO];
    let mut we = [_mm512_setzero_ps(); NO];
    for o in 0..NO {
        wo[o] = _mm512_castsi512_ps(_mm512_and_si512(wv[o], mask));
        we[o] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wv[o]));
    }
    if NR == 1 {
        // One row (plain decoding): few accumulators, nothing to spill; the single-row rate
        // stays that of the code measured before the asm rows.
        let (xo, xe) = (_mm512_loadu_ps(xr), _mm512_loadu_ps(xr.add(16)));
        for o in 0..NO {
            acc[0][o] = _mm512_fmadd_ps(wo[o], xo, acc[0][o]);
            acc[0][o] = _mm512_fmadd_ps(we[o], xe, acc[0][o]);
        }
        return;
    }
    for (r, a) in acc.iter_mut().enumerate() {
        em512_row(a, &wo, &we, xr.add(r * kp));
    }
}

/// One row's FMAs of [`em512_chunk`] in one asm block, loads included. Written as
/// intrinsics, LLVM hoisted every row's loads to the top of the chunk (the rows are
/// read-only, so nothing orders them) and spilled a quarter of the accumulators to the
/// stack: the chains then ran through memory at about half the FMA rate.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn em512_row<const NO: usize>(
    a: &mut [__m512; NO],
    wo: &[__m512; NO],
    we: &[__m512; NO],
    p: *const f32,
) {
    // One arm per block width; the operands name the array elements directly, so each arm
    // only touches indices below its NO.
    macro_rules! row {
        ($($i:literal $ai:ident $wo:ident $we:ident),+) => {
            asm!(
                "vmovups {xo}, [{p}]",
                "vmovups {xe}, [{p} + 64]",
                $(
                    concat!("vfmadd231ps {", stringify!($ai), "}, {", stringify!($wo), "}, {xo}"),
                    concat!("vfmadd231ps {", stringify!($ai), "}, {", stringify!($we), "}, {xe}"),
                )+
                p = in(reg) p,
                xo = out(zmm_reg) _,
                xe = out(zmm_reg) _,
                $(
                    $ai = inout(zmm_reg) a[$i],
                    $wo = in(zmm_reg) wo[$i],
                    $we = in(zmm_reg) we[$i],
                )+
                options(nostack, readonly, preserves_flags),
            )
        };
    }
    match NO {
        1 => row!(0 a0 o0 e0),
        2 => row!(0 a0 o0 e0, 1 a1 o1 e1),
        3 => row!(0 a0 o0 e0, 1 a1 o1 e1, 2 a2 o2 e2),
        4 => row!(0 a0 o0 e0, 1 a1 o1 e1, 2 a2 o2 e2, 3 a3 o3 e3),
        8 => row!(
            0 a0 o0 e0, 1 a1 o1 e1, 2 a2 o2 e2, 3 a3 o3 e3,
            4 a4 o4 e4, 5 a5 o5 e5, 6 a6 o6 e6, 7 a7 o7 e7
        ),
        // Wider blocks (16 outputs of attention's short rows) cannot hold their operands
        // in registers anyway.
        _ => {
            let (xo, xe) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            for o in 0..NO {
                a[o] = _mm512_fmadd_ps(wo[o], xo, a[o]);
                a[o] = _mm512_fmadd_ps(we[o], xe, a[o]);
            }
        }
    }
}

/// [`block_em512`] for `nr` rows (1 to [`MAX_ROWS_EM512`]), `NO` outputs.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block_em512_n<const NO: usize>(
    xs: &[f32],
    kp: usize,
    nr: usize,
    w: &WeightView,
    j: usize,
    r0: usize,
    y: *mut f32,
    pf: Prefetch,
) {
    match nr {
        1 => block_em512::<NO, 1>(xs, kp, w, j, r0, y, pf),
        2 => block_em512::<NO, 2>(xs, kp, w, j, r0, y, pf),
        3 => block_em512::<NO, 3>(xs, kp, w, j, r0, y, pf),
        4 => block_em512::<NO, 4>(xs, kp, w, j, r0, y, pf),
        5 => block_em512::<NO, 5>(xs, kp, w, j, r0, y, pf),
        _ => unreachable!("row blocks hold at most MAX_ROWS_EM512 rows"),
    }
}

/// Rows per register block of [`block_em512`]: 4 outputs x 5 rows is 20 accumulators, 8
/// widened weight vectors, the mask and a row's two vectors: 31 of the 32 registers. (On
/// 2026-12-01's host, one thread, weights in L2: 4 x 5 blocks ran 60-65 G multiply-adds/s of a
/// measured 89 peak at 5-16 rows; 4 x 4, 3 x 7 and 2 x 10-12 were no better, 2 x 12 worse
/// from 64 rows on, where the rows no longer fit in L1.)
const MAX_ROWS_EM512: usize = 5;

/// The `m` rows in [`row_blocks`] of at most [`MAX_ROWS_EM512`], over outputs `j..j + NO`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_em512<const NO: usize>(
    xs: &[f32],
    kp: usize,
    m: usize,
    w: &WeightView,
    j: usize,
    y: *mut f32,
) {
    for (r, nr) in row_blocks(m, MAX_ROWS_EM512) {
        let pf = Prefetch::ahead(w.row_ptr(j), NO * 2 * w.k, w.k / 32, r == 0);
        block_em512_n::<NO>(xs, kp, nr, w, j, r, y, pf);
    }
}

/// Decode rows up to this many (a verification of up to 11 drafts) take one register block
/// of 2 outputs x all rows ([`block_em512_2xn`]): 24 accumulators, 4 widened weights, the
/// mask and a row's two vectors are 31 registers.
const MAX_DECODE_ROWS_EM512: usize = 12;

/// How far ahead (in blocks of 2 outputs) [`block_em512_2xn`] prefetches, into L2.
const DECODE_PREFETCH_BLOCKS: usize = 4;

/// [`block_em512`] over outputs `j, j + 1` and all `nr` (6 to [`MAX_DECODE_ROWS_EM512`]) rows:
/// one pass over the weights, so their stream from memory overlaps the rows' arithmetic. The
/// row blocks of at most 5 that prompts take run a second block over each tile of weights
/// after the first has streamed it, and the stream waits meanwhile: 9 rows cost x1.73 of one
/// row that way and x1.45 in one block on 2026-12-01's AVX-512 host (interleaved, medians).
/// The prefetches go 4 blocks (9 KB at LLaMA widths) ahead into L2: one block ahead into L1,
/// as the other kernels do, left the stream short by about 10%.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block_em512_2xn(xs: &[f32], kp: usize, nr: usize, w: &WeightView, j: usize, y: *mut f32) {
    let bytes = 2 * 2 * w.k;
    let pf = Prefetch {
        from: w.row_ptr(j).wrapping_add(DECODE_PREFETCH_BLOCKS * bytes),
        lines: bytes.div_ceil(64).div_ceil((w.k / 32).max(1)),
        far: true,
    };
    match nr {
        6 => block_em512::<2, 6>(xs, kp, w, j, 0, y, pf),
        7 => block_em512::<2, 7>(xs, kp, w, j, 0, y, pf),
        8 => block_em512::<2, 8>(xs, kp, w, j, 0, y, pf),
        9 => block_em512::<2, 9>(xs, kp, w, j, 0, y, pf),
        10 => block_em512::<2, 10>(xs, kp, w, j, 0, y, pf),
        11 => block_em512::<2, 11>(xs, kp, w, j, 0, y, pf),
        12 => block_em512::<2, 12>(xs, kp, w, j, 0, y, pf),
        _ => unreachable!("6 to MAX_DECODE_ROWS_EM512 rows"),
    }
}

/// bf16 weights on AVX-512F without AVX512-BF16; `xs` as for [`range_dp256`].
#[target_feature(enable = "avx512f")]
pub(in crate::native::matmul) unsafe fn range_em512(
    xs: &[f32],
    kp: usize,
    m: usize,
    w: &WeightView,
    y: *mut f32,
    cols: std::ops::Range<usize>,
) {
    let mut j = cols.start;
    let iters = w.k / 32;
    let stride = 2 * w.k;
    if w.k <= SHORT_K && m < 4 {
        while j + 16 <= cols.end {
            for r in 0..m {
                let pf = Prefetch::ahead(w.row_ptr(j), 16 * stride, iters, r == 0);
                block_em512::<16, 1>(xs, kp, w, j, r, y, pf);
            }
            j += 16;
        }
    }
    if m == 1 {
        while j + 8 <= cols.end {
            let pf = Prefetch::ahead(w.row_ptr(j), 8 * stride, iters, true);
            block_em512::<8, 1>(xs, kp, w, j, 0, y, pf);
            j += 8;
        }
    }
    if m > MAX_ROWS_EM512 && m <= MAX_DECODE_ROWS_EM512 && w.k > SHORT_K {
        while j + 2 <= cols.end {
            block_em512_2xn(xs, kp, m, w, j, y);
            j += 2;
        }
    }
    let end4 = j + (cols.end - j) / 4 * 4;
    if m > MAX_DECODE_ROWS_EM512 && w.k > SHORT_K {
        // Several row blocks (a prompt): each block's rows stay in L1 while it runs over a
        // tile of outputs whose weights (at most EM512_TILE_BYTES) stay in L2 for the next
        // block. The other order (every block over 4 outputs before the next 4) re-reads all
        // the rows from L2 for every 4 outputs: twice the L2 traffic per multiply-add.
        let tile = (EM512_TILE_BYTES / stride).max(4) / 4 * 4;
        let mut t0 = j;
        while t0 < end4 {
            let t1 = (t0 + tile).min(end4);
            for (b, (r, nr)) in row_blocks(m, MAX_ROWS_EM512).enumerate() {
                for jj in (t0..t1).step_by(4) {
                    let pf = Prefetch::ahead(w.row_ptr(jj), 4 * stride, iters, b == 0);
                    block_em512_n::<4>(xs, kp, nr, w, jj, r, y, pf);
                }
            }
            t0 = t1;
        }
        j = end4;
    }
    while j + 4 <= cols.end {
        rows_em512::<4>(xs, kp, m, w, j, y);
        j += 4;
    }
    while j < cols.end {
        rows_em512::<1>(xs, kp, m, w, j, y);
        j += 1;
    }
}

/// The weights one row block runs over before the next block starts (see [`range_em512`]):
/// well inside a 1-2 MB L2 with the rows beside them.
const EM512_TILE_BYTES: usize = 384 * 1024;
