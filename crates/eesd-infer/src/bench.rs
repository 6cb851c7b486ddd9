//! The decode benchmark's measurements that live in Rust: our plain decode rate and the
//! memory-bandwidth floor of this process on this machine.

use eesd_core::device::synchronize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Bytes per second that a large matrix-vector product reaches through torch here: the same
/// kernel family (GEMV) that dominates batch-1 decoding. The median of `reps` timed runs after
/// a warm-up, over a `[n, n]` matrix of `kind` (f32: n = 8192 reads 268 MB, far beyond cache).
pub fn matvec_bandwidth(device: Device, kind: Kind, n: i64, reps: usize) -> f64 {
    let _g = tch::no_grad_guard();
    let w = Tensor::randn([n, n], (kind, device));
    let x = Tensor::randn([n], (kind, device));
    let bytes = (n * n) as f64 * kind.elt_size_in_bytes() as f64;
    for _ in 0..3 {
        let _ = w.mv(&x);
    }
    synchronize(device);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let y = w.mv(&x);
            synchronize(device);
            let dt = t.elapsed().as_secs_f64();
            drop(y);
            dt
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    bytes / times[times.len() / 2]
}
