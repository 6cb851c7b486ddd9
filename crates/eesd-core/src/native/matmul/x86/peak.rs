//! The CPU's multiply-add peak, measured: independent chains of the kernels' own instructions
//! (enough of them to cover the latency), no memory traffic. What "the compute floor" of a
//! product means in the benchmarks.

use super::*;

/// Chains per thread: FMA latency 4 cycles x 2 ports, with margin.
const CHAINS: usize = 12;

#[target_feature(enable = "avx512f")]
pub(in crate::native::matmul) unsafe fn fma_512(iters: usize) -> f32 {
    let mut acc = [_mm512_set1_ps(0.5); CHAINS];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[target_feature(enable = "avx2,fma")]
pub(in crate::native::matmul) unsafe fn fma_256(iters: usize) -> f32 {
    let mut acc = [_mm256_set1_ps(0.5); CHAINS];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    tree_256(s)
}

/// VDPBF16PS: 32 bf16 products per instruction.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(in crate::native::matmul) unsafe fn dpbf16_512(iters: usize) -> f32 {
    let mut acc = [_mm512_set1_ps(0.5); CHAINS];
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

/// Multiply-adds per loop of [`fma_512`], [`fma_256`], [`dpbf16_512`].
pub(in crate::native::matmul) const fn per_iter(lanes: usize) -> usize {
    CHAINS * lanes
}
