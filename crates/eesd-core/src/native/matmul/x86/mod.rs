//! The x86-64 kernels, one file per instruction-set family; each computes the sums the
//! module doc of [`super`] defines, bit for bit, and the tests compare every family with the
//! scalar definition. Shared here: tail chunks, row blocks, prefetches, the FMA kernels' dtype
//! codes.

// Register-blocked loops index several arrays with the same counters; iterators would hide it.
#![allow(clippy::needless_range_loop)]

mod amx;
mod avx2;
mod avx512;
mod bf16;
pub(super) mod peak;

// The AVX-512 family's lane trees and loads serve the others too.
use {avx512::*, bf16::*};

pub(super) use amx::{amx_ready, range_amx};
pub(super) use avx2::range_avx2;
pub(super) use avx512::range_avx512;
pub(super) use bf16::{
    range_dp256, range_dp512, range_em512, split_avx2, split_avx512, to_bf16_avx512,
};

pub(super) use super::{WKind, WeightView};
pub(super) use std::arch::asm;
pub(super) use std::arch::x86_64::*;

/// The `rem` (< N) elements from `p`, zero-padded to N: a tail chunk (no LLaMA dimension has
/// one). A fixed loop of selects, inlined: a copy of `rem` elements would become a call to
/// memcpy, and a call anywhere in a block kernel made LLVM keep accumulators on the stack
/// through its whole main loop (the kernel then ran at about half its rate).
#[inline(always)]
pub(super) unsafe fn tail<T: Copy + Default, const N: usize>(p: *const T, rem: usize) -> [T; N] {
    let mut b = [T::default(); N];
    for (l, v) in b.iter_mut().enumerate() {
        if l < rem {
            *v = *p.add(l);
        }
    }
    b
}

/// `m` rows as `(first row, rows)` blocks of at most `max`, as equal as they can be (11 rows
/// at most 5 are 4 + 4 + 3, not 5 + 5 + 1): a small last block has too few accumulators to
/// cover the FMA latency.
pub(super) fn row_blocks(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let blocks = m.div_ceil(max);
    (0..blocks).scan(0, move |r0, b| {
        let nr = m / blocks + usize::from(b < m % blocks);
        *r0 += nr;
        Some((*r0 - nr, nr))
    })
}

/// Software prefetches a block kernel issues while it computes: `lines` cache lines per
/// chunk iteration from `from` on (consecutive lines), into L1 (`far` false) or L2.
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    pub from: *const u8,
    pub lines: usize,
    pub far: bool,
}

impl Prefetch {
    /// While a block of `bytes` bytes from `row0` is computed in `iters` iterations: the
    /// next block, spread evenly, into L1. Only the `first` block of rows over these weights
    /// prefetches: the later ones would issue the same prefetches again, and with many rows
    /// they took a third of the load slots for lines already in L1.
    #[inline]
    pub fn ahead(row0: *const u8, bytes: usize, iters: usize, first: bool) -> Self {
        let lines = if first { bytes.div_ceil(64) } else { 0 };
        Prefetch {
            from: row0.wrapping_add(bytes),
            lines: lines.div_ceil(iters.max(1)),
            far: false,
        }
    }

    /// Iteration `it`'s prefetches (prefetches never fault, so addresses past the matrix
    /// are harmless).
    #[inline(always)]
    pub unsafe fn issue(&self, it: usize) {
        for l in 0..self.lines {
            let p = self.from.wrapping_add((it * self.lines + l) * 64) as *const i8;
            if self.far {
                _mm_prefetch::<_MM_HINT_T1>(p);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p);
            }
        }
    }
}

// The FMA kernels' weight dtypes as const generics, so the inner loops carry no dtype
// branch (bf16 weights always take the VDPBF16PS / AMX kernels below).
pub(super) const F32: u8 = 0;
pub(super) const F16: u8 = 2;

pub(super) fn code(kind: WKind) -> u8 {
    match kind {
        WKind::F32 => F32,
        WKind::Bf16 => unreachable!("bf16 weights take the bf16 kernels"),
        WKind::F16 => F16,
    }
}
