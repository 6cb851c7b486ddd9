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

/// Decode costs of a model shape with random weights, measured on `device`: what the
/// controller's cost model sees on a real large model (EESD.md section 6; issue: GPU timings).
pub mod shape {
    use crate::speculative::Engine;
    use eesd_core::device::synchronize;
    use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
    use eesd_core::model::Llama;
    use std::time::Instant;
    use tch::{Kind, Tensor};

    fn median_secs(reps: usize, dev: tch::Device, mut f: impl FnMut()) -> f64 {
        f();
        synchronize(dev);
        let mut v: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                synchronize(dev);
                t.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    /// Plain decode seconds per token after a `context`-token prompt (median over `steps`).
    pub fn plain_step(base: &Llama, context: i64, steps: usize) -> f64 {
        let _g = tch::no_grad_guard();
        let dev = base.device;
        let mut cache = base.new_cache(1, context + 2);
        let ids = Tensor::randint(base.cfg.vocab_size as i64, [1, context], (Kind::Int64, dev));
        let _ = base.forward(&ids, &mut cache);
        let one = ids.narrow(1, 0, 1);
        median_secs(steps, dev, || {
            let logits = base.forward(&one, &mut cache);
            let _ = logits.argmax(-1, false).int64_value(&[0]);
            cache.truncate(context);
        })
    }

    /// (c, [v(0..=k_max)]) for exit layer `n` with a one-layer random head and a draft
    /// vocabulary of `draft_vocab` tokens (0 = full), relative to one plain step.
    pub fn spec_costs(
        base: &Llama,
        n: usize,
        draft_vocab: usize,
        k_max: usize,
        context: i64,
    ) -> (f64, Vec<f64>) {
        let mut spec = HeadSpec::for_base(base, "shape", n);
        spec.init = HeadInit::Random;
        let vocab: Vec<u32> = (0..draft_vocab as u32).collect();
        let head = EarlyExitHead::init(base, spec, (draft_vocab > 0).then_some(vocab.as_slice()))
            .expect("head");
        let engine = Engine::new(base, Some(&head));
        let t = crate::cost::CostTracker::calibrate(&engine, k_max, context, 9);
        let c = t.costs();
        (c.draft_step, c.verify)
    }

    /// Seconds of one matrix-vector product over `bytes` of weights in `kind`: the bandwidth
    /// this process reaches on the device.
    pub fn bandwidth(dev: tch::Device, kind: Kind) -> f64 {
        let _g = tch::no_grad_guard();
        let n: i64 = 16384;
        let w = Tensor::randn([n, n], (kind, dev));
        let x = Tensor::randn([n], (kind, dev));
        let secs = median_secs(20, dev, || {
            let _ = w.mv(&x);
        });
        (n * n) as f64 * kind.elt_size_in_bytes() as f64 / secs
    }
}
