//! bf16 weights on AMX: TDPBF16PS over a tile-ordered copy of the weights (the same sums as
//! VDPBF16PS, accumulated by the tile unit).

#![allow(clippy::needless_range_loop)]

use super::*;

extern "C" {
    fn syscall(num: i64, ...) -> i64;
}

/// CPUID says AMX-BF16 and AMX-TILE, and Linux granted this process the tile state
/// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per process.
pub(in crate::native::matmul) fn amx_ready() -> bool {
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
pub(super) struct TileCfg([u8; 64]);

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
pub(in crate::native::matmul) unsafe fn range_amx(
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
                                    (tile as *const u8).wrapping_add(4096 + 64 * l) as *const i8,
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
