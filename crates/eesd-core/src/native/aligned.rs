//! Buffers whose first element starts a cache line.
//!
//! Why: an AVX-512 load from an address that is not 64-byte aligned spans two cache lines and
//! takes two load slots. `Vec<f32>` is 16-byte aligned, so every row a kernel read from one
//! split; with the rows in L2 (a prompt's worth) the 4 x 4 FMA block ran at 42 G multiply-adds
//! per second per core instead of 80 (one-off measurement, 2026-12-01, AVX-512 Xeon). Rows of
//! a multiple of 16 f32 (every LLaMA width) then all start a line.

use std::ops::{Deref, DerefMut};

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A zero-filled buffer of `len` plain values (`f32`, `u16`, `u32`: types for which all-zero
/// bits are a value), 64-byte aligned.
pub struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

/// Types whose all-zero bit pattern is a valid value and which have no drop glue.
///
/// # Safety
/// Implementors must be `Copy`, at most 64 bytes of alignment, and valid for all-zero bits.
pub unsafe trait Plain: Copy {}
// SAFETY: plain numbers; zero bits are 0.
unsafe impl Plain for f32 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for u32 {}

impl<T: Plain> Aligned<T> {
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        Aligned {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _t: std::marker::PhantomData,
        }
    }

    /// A copy of `src`.
    pub fn from_slice(src: &[T]) -> Self {
        let mut a = Self::zeroed(src.len());
        a.copy_from_slice(src);
        a
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len * size_of::<T>() initialised (zeroed or written)
        // bytes, aligned to 64 >= align_of::<T>().
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_a_line_and_holds_its_values() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = Aligned::<f32>::zeroed(len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|v| *v == 0.0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as f32;
            }
            let b = Aligned::from_slice(&a[..]);
            assert_eq!(&b[..], &a[..]);
            let h = Aligned::<u16>::zeroed(len);
            assert_eq!(h.as_ptr() as usize % 64, 0);
        }
    }
}
