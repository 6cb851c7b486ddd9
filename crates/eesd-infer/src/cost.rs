//! The controller's cost model, measured: seconds of a draft step and of verifying k+1
//! positions, first by a short calibration on scratch caches, then as running averages of the
//! real rounds (EESD.md section 2: "both measured online").

use crate::controller::Costs;
use crate::speculative::{Engine, Hidden};
use eesd_core::device::synchronize;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Exponential moving average.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ema {
    pub value: Option<f64>,
}

impl Ema {
    const ALPHA: f64 = 0.1;

    pub fn add(&mut self, x: f64) {
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + Self::ALPHA * (x - v),
        });
    }
}

/// Seconds per draft step and per verification of k+1 positions (k = 0..=k_max).
#[derive(Debug, Clone)]
pub struct CostTracker {
    pub draft_step: Ema,
    pub verify: Vec<Ema>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl CostTracker {
    pub fn new(k_max: usize) -> Self {
        CostTracker {
            draft_step: Ema::default(),
            verify: vec![Ema::default(); k_max + 1],
        }
    }

    pub fn k_max(&self) -> usize {
        self.verify.len() - 1
    }

    /// Times the draft step and every verify width on scratch caches holding `context`
    /// random tokens (median of `reps` after a warm-up), so the first round already has a
    /// measured cost model.
    pub fn calibrate(engine: &Engine, k_max: usize, context: i64, reps: usize) -> Self {
        let _g = tch::no_grad_guard();
        let mut t = Self::new(k_max);
        let base = engine.base;
        let dev = base.device;
        let k_max = k_max.min(engine.verify_width().map_or(k_max, |w| w - 1));
        let mut cache = engine.new_cache(context as usize, k_max + 1);
        let cap = cache.capacity();
        let ids: Vec<u32> = Vec::<i64>::try_from(Tensor::randint(
            base.cfg.vocab_size as i64,
            [context],
            (Kind::Int64, tch::Device::Cpu),
        ))
        .expect("random ids")
        .into_iter()
        .map(|t| t as u32)
        .collect();
        let mut head_cache = engine.new_head_cache(cap);
        let _ = engine
            .prefill(&ids, &mut cache, head_cache.as_mut())
            .expect("calibration prefill");
        let one = Tensor::from_slice(&[ids[0] as i64]).to_device(dev);
        // Timed the way the decode loop runs (torch single-threaded on the native path).
        let _threads = engine.decode_threads();
        let time = |f: &mut dyn FnMut()| {
            f(); // warm-up
            synchronize(dev);
            median(
                (0..reps)
                    .map(|_| {
                        let s = Instant::now();
                        f();
                        synchronize(dev);
                        s.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        if let Some(hc) = head_cache.as_mut() {
            let secs = time(&mut || {
                let h = engine.embed_lower(&one, &mut cache).expect("draft step");
                let logits = engine.head_logits(&h, hc).expect("draft step");
                let _ = logits.argmax(-1, false).int64_value(&[0]);
                cache.truncate(context);
                hc.truncate(context);
            });
            t.draft_step.add(secs);
        }
        for k in 0..=k_max {
            let secs = time(&mut || {
                // Verification: [0, N) for one token, [N, L) over k+1 positions.
                let h = engine.embed_lower(&one, &mut cache).expect("verify");
                let parts: Vec<Hidden> = (0..=k).map(|_| h.share()).collect();
                let logits = engine
                    .upper_logits(&Hidden::cat(&parts), &mut cache)
                    .expect("verify");
                let _ = Vec::<i64>::try_from(
                    logits
                        .argmax(-1, false)
                        .reshape([-1])
                        .to_device(tch::Device::Cpu),
                );
                cache.truncate(context);
            });
            t.verify[k].add(secs);
        }
        t
    }

    /// Costs relative to a plain step (`verify[0]`). Widths never timed are interpolated
    /// linearly between timed ones.
    pub fn costs(&self) -> Costs {
        let k_max = self.k_max();
        let known: Vec<(usize, f64)> = self
            .verify
            .iter()
            .enumerate()
            .filter_map(|(k, e)| e.value.map(|v| (k, v)))
            .collect();
        let full = known.first().map(|&(_, v)| v).unwrap_or(1.0);
        let at = |k: usize| -> f64 {
            if let Some(&(_, v)) = known.iter().find(|(j, _)| *j == k) {
                return v;
            }
            let lo = known.iter().rev().find(|(j, _)| *j < k);
            let hi = known.iter().find(|(j, _)| *j > k);
            match (lo, hi) {
                (Some(&(a, va)), Some(&(b, vb))) => {
                    va + (vb - va) * (k - a) as f64 / (b - a) as f64
                }
                (Some(&(_, va)), None) => va,
                (None, Some(&(_, vb))) => vb,
                (None, None) => full,
            }
        };
        Costs {
            draft_step: self.draft_step.value.unwrap_or(0.5 * full) / full,
            verify: (0..=k_max).map(|k| at(k) / full).collect(),
        }
    }
}
