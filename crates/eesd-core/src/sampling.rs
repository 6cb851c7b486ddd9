//! Turning logits into the next token: temperature, top-k and top-p, then argmax or a draw.
//!
//! [`SamplingParams::probs`] is the *processed* distribution. Speculative verification must
//! apply this same function to the draft's and the base's logits, or it stops being lossless
//! (EESD.md section 2).

use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// How many of the most likely tokens [`SamplingParams::probs`] sorts before falling back to a
/// full sort for top-p.
const NUCLEUS_CANDIDATES: i64 = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges a user can get wrong.
    pub fn new(temperature: f64, top_k: usize, top_p: f64) -> Result<Self> {
        if temperature.is_nan() || temperature < 0.0 || !temperature.is_finite() {
            return Err(Error::Input(format!(
                "temperature must be a finite number >= 0, got {temperature}"
            )));
        }
        if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
            return Err(Error::Input(format!(
                "top-p must be in (0, 1], got {top_p}"
            )));
        }
        Ok(SamplingParams {
            temperature,
            top_k,
            top_p,
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Logits `[B, V]` -> processed probabilities `[B, V]` (f32), in transformers' order:
    /// temperature, top-k, top-p (keeping at least one token), renormalised.
    pub fn probs(&self, logits: &Tensor) -> Tensor {
        let t = if self.is_greedy() {
            1.0
        } else {
            self.temperature
        };
        let mut logits = logits.to_kind(Kind::Float) / t;
        let v = logits.size()[1];
        if self.top_k > 0 && (self.top_k as i64) < v {
            let (top, _) = logits.topk(self.top_k as i64, -1, true, true);
            let kth = top.narrow(1, self.top_k as i64 - 1, 1);
            logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        let probs = logits.softmax(-1, Kind::Float);
        if self.top_p >= 1.0 {
            return probs;
        }
        // The nucleus is nearly always among the few most likely tokens: sort only those when
        // their mass reaches top_p in every row (then the kept set is the one a full sort
        // gives), else sort everything. A full sort of 49k probabilities costs ~3 ms per row
        // on a CPU core, which a verification of k+1 positions pays k+1 times.
        let candidates = NUCLEUS_CANDIDATES.min(v);
        let (sorted, idx) = if candidates < v {
            let (top, idx) = probs.topk(candidates, -1, true, true);
            let mass = top.sum_dim_intlist(-1, false, Kind::Float);
            if mass.min().double_value(&[]) >= self.top_p {
                (top, idx)
            } else {
                probs.sort(-1, true)
            }
        } else {
            probs.sort(-1, true)
        };
        // A token stays if the mass strictly before it is below top_p: the smallest set whose
        // mass reaches top_p, and never empty.
        let before = sorted.cumsum(-1, Kind::Float) - &sorted;
        let kept_sorted = sorted.where_scalarother(&before.lt(self.top_p), 0.0);
        let kept = probs.zeros_like().scatter(-1, &idx, &kept_sorted);
        &kept / kept.sum_dim_intlist(-1, true, Kind::Float)
    }

    /// Next tokens `[B]` (i64) from logits `[B, V]`: argmax when greedy, else a draw from
    /// [`Self::probs`] with torch's generator (seed it with `tch::manual_seed`).
    pub fn select(&self, logits: &Tensor) -> Tensor {
        if self.is_greedy() {
            logits.argmax(-1, false)
        } else {
            self.probs(logits).multinomial(1, false).squeeze_dim(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs_of(p: &SamplingParams, logits: &[f32]) -> Vec<f32> {
        let t = Tensor::from_slice(logits).unsqueeze(0);
        Vec::<f32>::try_from(p.probs(&t).squeeze()).unwrap()
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(SamplingParams::new(-0.1, 0, 1.0).is_err());
        assert!(SamplingParams::new(f64::NAN, 0, 1.0).is_err());
        assert!(SamplingParams::new(1.0, 0, 0.0).is_err());
        assert!(SamplingParams::new(1.0, 0, 1.5).is_err());
        assert!(SamplingParams::new(0.7, 40, 0.9).is_ok());
    }

    #[test]
    fn top_k_keeps_k_tokens() {
        let p = SamplingParams::new(1.0, 2, 1.0).unwrap();
        let q = probs_of(&p, &[1.0, 3.0, 2.0, 0.0]);
        assert_eq!(q[0], 0.0);
        assert_eq!(q[3], 0.0);
        assert!((q[1] + q[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.2 (logits are their logs)
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|x| x.ln()).collect();
        let q = probs_of(&SamplingParams::new(1.0, 0, 0.6).unwrap(), &l);
        assert!((q[0] - 0.625).abs() < 1e-5 && (q[1] - 0.375).abs() < 1e-5 && q[2] == 0.0);
        // p below the top token's mass still keeps that token
        let q = probs_of(&SamplingParams::new(1.0, 0, 0.1).unwrap(), &l);
        assert_eq!(q, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn top_p_over_candidates_equals_the_full_sort() {
        // Peaked rows (the nucleus among the first candidates) and a flat one (it is not:
        // the full sort runs), in one batch and alone.
        tch::manual_seed(3);
        let v = 4096;
        let peaked = Tensor::randn([3, v], (Kind::Float, tch::Device::Cpu)) * 6.0;
        let flat = Tensor::randn([1, v], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let p = SamplingParams::new(0.7, 0, 0.9).unwrap();
        for logits in [
            peaked.shallow_clone(),
            Tensor::cat(&[&peaked, &flat], 0),
            flat,
        ] {
            let got = p.probs(&logits);
            // The definition: sort everything.
            let probs = (logits / 0.7).softmax(-1, Kind::Float);
            let (sorted, idx) = probs.sort(-1, true);
            let before = sorted.cumsum(-1, Kind::Float) - &sorted;
            let kept = probs.zeros_like().scatter(
                -1,
                &idx,
                &sorted.where_scalarother(&before.lt(0.9), 0.0),
            );
            let want = &kept / kept.sum_dim_intlist(-1, true, Kind::Float);
            assert!(got.equal(&want));
        }
    }

    #[test]
    fn temperature_sharpens() {
        let a = probs_of(&SamplingParams::new(1.0, 0, 1.0).unwrap(), &[1.0, 2.0]);
        let b = probs_of(&SamplingParams::new(0.5, 0, 1.0).unwrap(), &[1.0, 2.0]);
        assert!(b[1] > a[1]);
    }
}
