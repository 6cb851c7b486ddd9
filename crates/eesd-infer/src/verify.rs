//! Acceptance of a draft against the base's distributions (EESD.md section 2).
//!
//! Both functions take every position at once and return the verdict with a single host read.
//! p and q must be the *processed* distributions (same temperature, top-k, top-p) or sampling
//! stops being lossless.

use tch::{Kind, Tensor};

/// How a round's draft fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Drafts proposed.
    pub proposed: usize,
    /// Leading drafts accepted.
    pub accepted: usize,
    /// The base's token after the accepted prefix: the correction at the first rejection, or
    /// the bonus token when every draft was accepted.
    pub next_token: u32,
}

/// Greedy: accept the longest prefix of drafts equal to the base's argmax.
/// `base_logits` `[K+1, V]`, `drafts` `[K]` (i64 token ids).
pub fn accept_greedy(base_logits: &Tensor, drafts: &Tensor) -> Verdict {
    let k = drafts.size()[0];
    let target = base_logits.argmax(-1, false); // [K+1]
    let matches = target
        .narrow(0, 0, k)
        .eq_tensor(drafts)
        .to_kind(Kind::Int64);
    read_verdict(&matches, &target)
}

/// The one host read of a round: `ok` `[K]` (1 where draft i passed its test) and the base's
/// candidate token after each accepted prefix length `[K+1]` -> the verdict.
fn read_verdict(ok: &Tensor, candidates: &Tensor) -> Verdict {
    let accepted = ok.cumprod(0, Kind::Int64).sum(Kind::Int64).unsqueeze(0);
    let host =
        Vec::<i64>::try_from(Tensor::cat(&[&accepted, candidates], 0).to_device(tch::Device::Cpu))
            .expect("verdict to host");
    let a = host[0] as usize;
    Verdict {
        proposed: ok.size()[0] as usize,
        accepted: a,
        next_token: host[1 + a] as u32,
    }
}

/// Rejection sampling (Leviathan et al.; Chen et al.): accept draft x_i with probability
/// min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a sample of norm(max(0, p_i - q_i));
/// after K acceptances emit a sample of p_{K+1}.
/// `p` `[K+1, V]` base, `q` `[K, V]` draft (full vocabulary), `drafts` `[K]`, `uniform` `[K]`
/// draws from U[0, 1). Samples come from torch's generator.
/// Fails when a distribution holds NaN, inf or negative mass (a broken model or head).
pub fn accept_sampled(
    p: &Tensor,
    q: &Tensor,
    drafts: &Tensor,
    uniform: &Tensor,
) -> Result<Verdict, tch::TchError> {
    let k = drafts.size()[0];
    let p_k = p.narrow(0, 0, k);
    let idx = drafts.unsqueeze(1);
    let pd = p_k.gather(1, &idx, false).squeeze_dim(1);
    let qd = q.gather(1, &idx, false).squeeze_dim(1);
    // u < p/q, written as u * q < p so that q = 0 (never drafted) cannot divide by zero, and a
    // draft the base gives zero probability is never accepted.
    let ok = (uniform * &qd)
        .lt_tensor(&pd)
        .logical_and(&pd.gt(0.0))
        .to_kind(Kind::Int64);
    // One candidate per position: the residual for each draft position, p itself for the bonus.
    let residual = (&p_k - q).clamp_min(0.0);
    let mass = residual.sum_dim_intlist(-1, true, Kind::Float);
    // p == q at a rejected position cannot happen in exact arithmetic; guard against rounding.
    let residual = residual.where_self(&mass.gt(0.0), &p_k);
    let rows = Tensor::cat(&[residual, p.narrow(0, k, 1)], 0);
    let candidates = rows.f_multinomial(1, false)?.squeeze_dim(1); // [K+1]
    Ok(read_verdict(&ok, &candidates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_distribution_is_an_error_not_a_panic() {
        let p = Tensor::from_slice(&[f32::NAN, 0.5, 0.5, f32::NAN]).view([2, 2]);
        let q = Tensor::from_slice(&[0.5f32, 0.5]).view([1, 2]);
        let v = accept_sampled(
            &p,
            &q,
            &Tensor::from_slice(&[1i64]),
            &Tensor::from_slice(&[0.9f32]),
        );
        assert!(v.is_err());
    }

    fn t2(rows: &[&[f32]]) -> Tensor {
        Tensor::stack(
            &rows
                .iter()
                .map(|r| Tensor::from_slice(r))
                .collect::<Vec<_>>(),
            0,
        )
    }

    #[test]
    fn greedy_takes_the_matching_prefix_and_the_correction() {
        let logits = t2(&[&[0.0, 5.0, 1.0], &[3.0, 0.0, 1.0], &[0.0, 0.0, 9.0]]); // argmax 1, 0, 2
        let v = accept_greedy(&logits, &Tensor::from_slice(&[1i64, 2]));
        assert_eq!(
            v,
            Verdict {
                proposed: 2,
                accepted: 1,
                next_token: 0
            }
        );
        let v = accept_greedy(&logits, &Tensor::from_slice(&[1i64, 0]));
        assert_eq!(
            v,
            Verdict {
                proposed: 2,
                accepted: 2,
                next_token: 2
            }
        ); // bonus
        let v = accept_greedy(&logits, &Tensor::from_slice(&[2i64, 0]));
        assert_eq!(v.accepted, 0); // a later match does not count after a mismatch
    }

    #[test]
    fn zero_probability_drafts_are_never_accepted() {
        tch::manual_seed(0);
        let p = t2(&[&[0.0, 1.0, 0.0], &[0.5, 0.5, 0.0]]);
        let q = t2(&[&[1.0, 0.0, 0.0]]);
        for u in [0.0f32, 0.5, 0.999] {
            let v = accept_sampled(
                &p,
                &q,
                &Tensor::from_slice(&[0i64]),
                &Tensor::from_slice(&[u]),
            )
            .unwrap();
            assert_eq!(v.accepted, 0);
            assert_eq!(v.next_token, 1, "the residual holds only token 1");
        }
    }

    #[test]
    fn identical_distributions_always_accept() {
        tch::manual_seed(1);
        let p = t2(&[&[0.2, 0.8], &[0.5, 0.5], &[0.3, 0.7]]);
        let q = p.narrow(0, 0, 2).copy();
        let v = accept_sampled(
            &p,
            &q,
            &Tensor::from_slice(&[1i64, 0]),
            &Tensor::from_slice(&[0.999f32, 0.999]),
        )
        .unwrap();
        assert_eq!(v.accepted, 2);
    }

    /// The emitted token of a one-draft round is distributed as p, whatever q is.
    #[test]
    fn emitted_token_follows_p() {
        tch::manual_seed(2);
        let p = Tensor::from_slice(&[0.5f32, 0.3, 0.15, 0.05, 0.0]).unsqueeze(0);
        for q in [[0.05f32, 0.05, 0.1, 0.4, 0.4], [0.45, 0.35, 0.1, 0.1, 0.0]] {
            let q = Tensor::from_slice(&q).unsqueeze(0);
            let n = 20000;
            let mut counts = [0f64; 5];
            for _ in 0..n {
                let d = q.multinomial(1, false).squeeze_dim(1);
                let u = Tensor::rand([1], (Kind::Float, tch::Device::Cpu));
                let pp = Tensor::cat(&[&p, &p], 0);
                let v = accept_sampled(&pp, &q, &d, &u).unwrap();
                let tok = if v.accepted == 1 {
                    d.int64_value(&[0]) as usize
                } else {
                    v.next_token as usize
                };
                counts[tok] += 1.0;
            }
            let want = Vec::<f32>::try_from(p.squeeze()).unwrap();
            // Pearson chi-square over the 4 tokens with p > 0: df = 3, p = 0.001 critical value 16.27.
            let chi2: f64 = (0..4)
                .map(|i| {
                    (counts[i] - n as f64 * want[i] as f64).powi(2) / (n as f64 * want[i] as f64)
                })
                .sum();
            assert_eq!(counts[4], 0.0, "a zero-probability token was emitted");
            assert!(chi2 < 16.27, "chi2 = {chi2}, counts {counts:?}");
        }
    }

    /// A copied draft (proposed with certainty: q a point mass) keeps the emitted token's
    /// distribution p, whichever token was copied, likely, unlikely or impossible under p.
    #[test]
    fn a_copied_draft_keeps_p() {
        tch::manual_seed(3);
        let p = Tensor::from_slice(&[0.5f32, 0.3, 0.15, 0.05, 0.0]).unsqueeze(0);
        let want = [0.5f64, 0.3, 0.15, 0.05];
        for copied in [0i64, 3, 4] {
            let q = Tensor::zeros([1, 5], (Kind::Float, tch::Device::Cpu));
            let _ = q.narrow(1, copied, 1).fill_(1.0);
            let d = Tensor::from_slice(&[copied]);
            let pp = Tensor::cat(&[&p, &p], 0);
            let n = 20000;
            let mut counts = [0f64; 5];
            for _ in 0..n {
                let u = Tensor::rand([1], (Kind::Float, tch::Device::Cpu));
                let v = accept_sampled(&pp, &q, &d, &u).unwrap();
                let tok = if v.accepted == 1 {
                    copied as usize
                } else {
                    v.next_token as usize
                };
                counts[tok] += 1.0;
            }
            let chi2: f64 = (0..4)
                .map(|i| (counts[i] - n as f64 * want[i]).powi(2) / (n as f64 * want[i]))
                .sum();
            assert_eq!(
                counts[4], 0.0,
                "copied {copied}: a zero-probability token was emitted"
            );
            assert!(
                chi2 < 16.27,
                "copied {copied}: chi2 = {chi2}, counts {counts:?}"
            );
        }
    }
}
