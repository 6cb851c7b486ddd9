//! The cost model's first measurement: a short interleaved calibration on scratch caches, so
//! the first round already knows what a draft step and each verify width cost here (EESD.md
//! section 2: "both measured online"; the real rounds refresh it, see [`crate::cost`]).

use super::backend::{Backend, Cache, Rows};
use super::Engine;
use crate::stats::median;
use eesd_core::sampling::SamplingParams;
use eesd_core::Result;
use rand::{Rng, SeedableRng};
use std::time::Instant;

impl<B: Backend> Engine<B> {
    /// Times the draft step and every verify width on scratch caches holding `context`
    /// random tokens (median of `reps` interleaved repetitions after a warm-up) and sets the
    /// cost model from them.
    pub fn calibrate(&mut self, context: usize, reps: usize) -> Result<()> {
        let b = &self.backend;
        let k_max = self.costs.k_max();
        let widths = k_max.min(b.verify_width().map_or(k_max, |w| w - 1));
        let (mut cache, mut head_cache) = b.new_caches(context, widths + 1, b.spec().has_head);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let vocab = b.spec().vocab as u32;
        let ids: Vec<u32> = (0..context).map(|_| rng.random_range(0..vocab)).collect();
        b.prefill(&ids, &mut cache, head_cache.as_mut())?;
        let one = b.token(ids[0]);
        let greedy = SamplingParams::default();
        // Timed the way the decode loop runs (torch single-threaded on the native path).
        let _threads = b.decode_threads();
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            b.synchronize();
            let s = Instant::now();
            f()?;
            b.synchronize();
            Ok(s.elapsed().as_secs_f64())
        };
        // A draft step: one token through [0, N) and the head, its draft read on the host.
        let draft = |cache: &mut B::Cache, hc: &mut B::Cache| -> Result<()> {
            let h = b.lower(&[&one], &mut [&mut *cache])?.remove(0);
            // `h` stands in for the previous final state: a head that reads one pays for it.
            let (logits, _) = b.draft(&[&h], &[Some(&h)], &mut [&mut *hc])?.remove(0);
            let d = b.choose_draft(&logits, &greedy, false)?;
            b.token_ids(&[d.token])?;
            cache.roll_back(context);
            hc.roll_back(context);
            Ok(())
        };
        // A verification of k+1 positions: [0, N) for one token, [N, L) over k+1.
        let verify = |k: usize, cache: &mut B::Cache| -> Result<()> {
            let h = b.lower(&[&one], &mut [&mut *cache])?.remove(0);
            let rows = Rows::cat(&vec![&h; k + 1]);
            let (logits, _) = b.upper(&[&rows], &mut [&mut *cache])?.remove(0);
            b.judge(&logits, &[], &[], &greedy)?;
            cache.roll_back(context);
            Ok(())
        };
        // Every width once per repetition, interleaved, so drift during the calibration
        // shifts all widths alike; medians over repetitions drop the outliers.
        let mut draft_secs = Vec::new();
        let mut verify_secs = vec![Vec::new(); widths + 1];
        for rep in 0..=reps.max(1) {
            if let Some(hc) = head_cache.as_mut() {
                let d = timed(&mut || draft(&mut cache, hc))?;
                if rep > 0 {
                    draft_secs.push(d); // repetition 0 is the warm-up
                }
            }
            for (k, v) in verify_secs.iter_mut().enumerate() {
                let secs = timed(&mut || verify(k, &mut cache))?;
                if rep > 0 {
                    v.push(secs);
                }
            }
        }
        let plain = median(verify_secs[0].clone());
        let relative: Vec<f64> = verify_secs.into_iter().map(|v| median(v) / plain).collect();
        let draft = (!draft_secs.is_empty()).then(|| median(draft_secs) / plain);
        self.costs.set_measured(plain, &relative, draft);
        Ok(())
    }
}
