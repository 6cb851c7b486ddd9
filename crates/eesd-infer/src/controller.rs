//! Where the draft length is decided: one trait, six controllers (EESD.md section 2).
//!
//! Pure Rust over plain numbers and a seeded RNG, so every policy is unit-tested in
//! milliseconds on simulated acceptance streams, without libtorch.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Beta, Distribution};
use std::fmt;

/// Round costs relative to one full decoding step (measured online, see `cost.rs`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Costs {
    /// c: one draft step (layers `[0, N)` + head, one token) / one full step.
    pub draft_step: f64,
    /// v[k]: verifying k+1 positions (layers `[0, N)` for one token + `[N, L)` over k+1) / one
    /// full step; `v[0]` is a plain step, about 1.
    pub verify: Vec<f64>,
}

impl Costs {
    /// A cost model with linear verify growth, for tests and before any measurement.
    pub fn linear(draft_step: f64, verify_slope: f64, k_max: usize) -> Self {
        Costs {
            draft_step,
            verify: (0..=k_max).map(|k| 1.0 + verify_slope * k as f64).collect(),
        }
    }

    pub fn verify(&self, k: usize) -> f64 {
        self.verify[k.min(self.verify.len() - 1)]
    }

    /// Cost of a round that drafts k tokens and verifies them.
    pub fn round(&self, k: usize) -> f64 {
        k as f64 * self.draft_step + self.verify(k)
    }

    pub fn k_max(&self) -> usize {
        self.verify.len() - 1
    }

    /// A pass over `rows` positions relative to one plain step: the verify table (a pass over
    /// k+1 rows), continued past its end at its last slope (products of many rows grow about
    /// linearly once compute-bound).
    fn pass(&self, rows: usize) -> f64 {
        let last = self.verify.len() - 1;
        let k = rows.saturating_sub(1);
        if k <= last {
            return self.verify[k];
        }
        let slope = if last > 0 {
            (self.verify[last] - self.verify[last - 1]).max(0.0)
        } else {
            0.0
        };
        self.verify[last] + slope * (k - last) as f64
    }

    /// The costs one sequence sees when its round runs in a batch of `batch` sequences
    /// (issue 22): what its drafts add to a pass that already carries every sequence's row,
    /// relative to its share of that pass (one plain token). A draft step holds up the whole
    /// batch, and extra verify rows cost what the pass's next rows cost, so under load
    /// drafting falls toward none by itself and comes back when the load drops. `batch` 1 is
    /// the table itself.
    pub fn at_batch(&self, batch: usize) -> Costs {
        if batch <= 1 {
            return self.clone();
        }
        let base = self.pass(batch);
        let share = base / batch as f64;
        Costs {
            draft_step: self.draft_step / share,
            verify: (0..=self.k_max())
                .map(|k| 1.0 + (self.pass(batch + k) - base) / share)
                .collect(),
        }
    }
}

/// Expected committed tokens of a round with k drafts when each is accepted with
/// probability theta independently: 1 + theta + ... + theta^k.
pub fn expected_tokens(theta: f64, k: usize) -> f64 {
    if (1.0 - theta).abs() < 1e-12 {
        (k + 1) as f64
    } else {
        (1.0 - theta.powi(k as i32 + 1)) / (1.0 - theta)
    }
}

/// The k in `k_min..=k_max` with the most expected tokens per unit cost at acceptance theta.
pub fn best_k(theta: f64, costs: &Costs, k_min: usize) -> usize {
    (k_min..=costs.k_max())
        .map(|k| (k, expected_tokens(theta, k) / costs.round(k)))
        .fold(
            (k_min, f64::MIN),
            |best, x| if x.1 > best.1 { x } else { best },
        )
        .0
}

/// What to do after a draft token was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Stop drafting; the token just drafted is proposed.
    Stop,
    /// Stop drafting and do not propose the token just drafted.
    StopDiscard,
}

/// How one round went, as the controller learns it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    pub drafted: usize,
    pub accepted: usize,
    /// Draft top-1 probability of each proposed token (empty when not measured).
    pub confidences: &'a [f32],
}

/// The default most drafts per round (`--max-draft`): verifying up to 9 positions costs
/// about one plain step where multi-row products are cheap (AMX, GPUs).
pub const DEFAULT_MAX_DRAFT: usize = 8;

/// The most drafts a round may propose: verifying more than 17 positions leaves the range
/// where a verification costs about one plain step (our kernels stream the weights once for up
/// to 16 rows; beyond, cost grows with every row), so longer drafts cannot pay.
pub const MAX_DRAFT_LIMIT: usize = 16;

pub trait Controller: Send {
    /// The most draft tokens for the coming round; 0 is a plain decoding step.
    fn plan(&mut self, costs: &Costs) -> usize;
    /// Whether this controller ever drafts (`off` does not: its sequences skip the head).
    fn drafts(&self) -> bool {
        true
    }
    /// Whether `after_draft` needs the draft's top-1 probability (a host read per draft step).
    fn wants_confidence(&self) -> bool {
        false
    }
    /// Called after draft token `i` (1-based) when `wants_confidence()`.
    fn after_draft(&mut self, _i: usize, _confidence: f32, _costs: &Costs) -> Next {
        Next::Continue
    }
    fn observe(&mut self, outcome: &Outcome);
    fn name(&self) -> String;
}

/// A borrowed controller drives a sequence and keeps what it learned for the next one.
impl<C: Controller + ?Sized> Controller for &mut C {
    fn plan(&mut self, costs: &Costs) -> usize {
        (**self).plan(costs)
    }
    fn drafts(&self) -> bool {
        (**self).drafts()
    }
    fn wants_confidence(&self) -> bool {
        (**self).wants_confidence()
    }
    fn after_draft(&mut self, i: usize, confidence: f32, costs: &Costs) -> Next {
        (**self).after_draft(i, confidence, costs)
    }
    fn observe(&mut self, outcome: &Outcome) {
        (**self).observe(outcome)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

impl fmt::Debug for dyn Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A Beta posterior over a per-token acceptance probability, with optional discounting toward
/// the prior so it tracks drift and, after plain rounds, slowly returns to exploring.
#[derive(Debug, Clone)]
pub struct BetaPosterior {
    pub a: f64,
    pub b: f64,
    prior: (f64, f64),
    gamma: f64,
}

impl BetaPosterior {
    pub fn new(prior: (f64, f64), gamma: f64) -> Self {
        BetaPosterior {
            a: prior.0,
            b: prior.1,
            prior,
            gamma,
        }
    }

    /// Censored Bernoulli update: `accepted` successes, then one failure if a rejection
    /// happened (tokens after the first rejection were never tested).
    pub fn update(&mut self, accepted: usize, rejected: bool) {
        self.a = self.prior.0 + self.gamma * (self.a - self.prior.0) + accepted as f64;
        self.b =
            self.prior.1 + self.gamma * (self.b - self.prior.1) + if rejected { 1.0 } else { 0.0 };
    }

    pub fn mean(&self) -> f64 {
        self.a / (self.a + self.b)
    }

    pub fn sample(&self, rng: &mut StdRng) -> f64 {
        Beta::new(self.a, self.b)
            .map(|d| d.sample(rng))
            .unwrap_or_else(|_| self.mean())
    }
}

/// Settings shared by both Thompson controllers.
#[derive(Debug, Clone)]
pub struct ThompsonConfig {
    pub k_max: usize,
    /// Beta prior (a, b); (1, 1) is uniform, or warm-started from the head's offline statistics.
    pub prior: (f64, f64),
    /// Discount in (0, 1]; 1 keeps all history.
    pub gamma: f64,
    /// Allow K = 0 (a plain step) when no draft length pays for itself.
    pub allow_plain: bool,
    pub seed: u64,
}

impl Default for ThompsonConfig {
    fn default() -> Self {
        ThompsonConfig {
            k_max: DEFAULT_MAX_DRAFT,
            prior: (1.0, 1.0),
            gamma: 0.995,
            allow_plain: true,
            seed: 0,
        }
    }
}

/// Beta-TS: sample theta from the posterior, pick the K with the most expected tokens per
/// unit of measured cost.
pub struct Thompson {
    cfg: ThompsonConfig,
    post: BetaPosterior,
    rng: StdRng,
}

impl Thompson {
    pub fn new(cfg: ThompsonConfig) -> Self {
        Thompson {
            post: BetaPosterior::new(cfg.prior, cfg.gamma),
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
        }
    }

    pub fn posterior(&self) -> &BetaPosterior {
        &self.post
    }
}

impl Controller for Thompson {
    fn plan(&mut self, costs: &Costs) -> usize {
        let theta = self.post.sample(&mut self.rng);
        let k_min = if self.cfg.allow_plain { 0 } else { 1 };
        best_k(theta, costs, k_min).min(self.cfg.k_max)
    }

    fn observe(&mut self, o: &Outcome) {
        if o.drafted > 0 {
            self.post.update(o.accepted, o.accepted < o.drafted);
        } else {
            self.post.update(0, false); // only the discount applies
        }
    }

    fn name(&self) -> String {
        "thompson".into()
    }
}

/// Calibration-TS: acceptance posteriors per bucket of the draft's own top-1 probability;
/// drafting stops once the chance that one more token survives no longer pays its cost.
pub struct CalibratedThompson {
    cfg: ThompsonConfig,
    buckets: Vec<BetaPosterior>,
    global: BetaPosterior,
    rng: StdRng,
    /// Probability (sampled) that every token drafted so far this round is accepted.
    survive: f64,
}

impl CalibratedThompson {
    pub const BUCKETS: usize = 10;

    pub fn new(cfg: ThompsonConfig) -> Self {
        CalibratedThompson {
            buckets: vec![BetaPosterior::new(cfg.prior, cfg.gamma); Self::BUCKETS],
            global: BetaPosterior::new(cfg.prior, cfg.gamma),
            rng: StdRng::seed_from_u64(cfg.seed),
            survive: 1.0,
            cfg,
        }
    }

    fn bucket(confidence: f32) -> usize {
        ((confidence.clamp(0.0, 1.0) * Self::BUCKETS as f32) as usize).min(Self::BUCKETS - 1)
    }

    /// Marginal cost of proposing draft `i` (1-based): its pass through [0, N) in the verify
    /// (about a draft step, c) plus the wider verify, v(i) - v(i - 1).
    fn propose_cost(i: usize, costs: &Costs) -> f64 {
        costs.draft_step + costs.verify(i) - costs.verify(i - 1)
    }
}

impl Controller for CalibratedThompson {
    /// Always at least look at one draft: its [0, N) pass is work the verify needs anyway, so
    /// drafting and then dropping an unsure first token costs only the head.
    fn plan(&mut self, _costs: &Costs) -> usize {
        self.survive = 1.0;
        self.cfg.k_max
    }

    fn wants_confidence(&self) -> bool {
        true
    }

    /// Token-aware stopping: the chance that drafts 1..=i all survive is the product of the
    /// sampled acceptance of each one's confidence bucket. Draft i is proposed only if that
    /// chance pays for proposing it; drafting goes on while the next one (at the overall
    /// acceptance rate) would pay too.
    fn after_draft(&mut self, i: usize, confidence: f32, costs: &Costs) -> Next {
        let theta = self.buckets[Self::bucket(confidence)].sample(&mut self.rng);
        self.survive *= theta;
        if self.cfg.allow_plain && self.survive < Self::propose_cost(i, costs) {
            return Next::StopDiscard;
        }
        let next_gain = self.survive * self.global.sample(&mut self.rng);
        if i >= self.cfg.k_max || next_gain < Self::propose_cost(i + 1, costs) {
            Next::Stop
        } else {
            Next::Continue
        }
    }

    fn observe(&mut self, o: &Outcome) {
        let tested = o.drafted.min(o.accepted + 1).min(o.confidences.len());
        for (j, &c) in o.confidences.iter().take(tested).enumerate() {
            self.buckets[Self::bucket(c)].update(usize::from(j < o.accepted), j >= o.accepted);
        }
        if o.drafted > 0 {
            self.global.update(o.accepted, o.accepted < o.drafted);
        } else {
            self.global.update(0, false);
        }
    }

    fn name(&self) -> String {
        "thompson-calibrated".into()
    }
}

/// `fixed:K`: always K drafts. `off`: always 0, i.e. plain decoding through the same code.
pub struct Fixed(pub usize);

impl Controller for Fixed {
    fn plan(&mut self, _: &Costs) -> usize {
        self.0
    }
    fn drafts(&self) -> bool {
        self.0 > 0
    }
    fn observe(&mut self, _: &Outcome) {}
    fn name(&self) -> String {
        if self.0 == 0 {
            "off".into()
        } else {
            format!("fixed:{}", self.0)
        }
    }
}

/// transformers' assisted-generation schedule: K += 2 after a fully accepted round, else
/// K = max(1, K - 1). Starts at 5 (transformers starts at 20, far past our K_max).
pub struct Heuristic {
    k: usize,
    k_max: usize,
}

impl Heuristic {
    pub fn new(k_max: usize) -> Self {
        Heuristic {
            k: 5.min(k_max),
            k_max,
        }
    }
}

impl Controller for Heuristic {
    fn plan(&mut self, _: &Costs) -> usize {
        self.k
    }
    fn observe(&mut self, o: &Outcome) {
        self.k = if o.accepted == o.drafted {
            (self.k + 2).min(self.k_max)
        } else {
            self.k.saturating_sub(1).max(1)
        };
    }
    fn name(&self) -> String {
        "heuristic".into()
    }
}

/// `confidence:P`: draft while the draft's top-1 probability is at least P; the first token
/// below P is not proposed (DISCO, Kangaroo, llama.cpp `--draft-p-min`).
pub struct Confidence {
    p: f32,
    k_max: usize,
}

impl Controller for Confidence {
    fn plan(&mut self, _: &Costs) -> usize {
        self.k_max
    }
    fn wants_confidence(&self) -> bool {
        true
    }
    fn after_draft(&mut self, i: usize, confidence: f32, _: &Costs) -> Next {
        if confidence < self.p {
            Next::StopDiscard
        } else if i >= self.k_max {
            Next::Stop
        } else {
            Next::Continue
        }
    }
    fn observe(&mut self, _: &Outcome) {}
    fn name(&self) -> String {
        format!("confidence:{}", self.p)
    }
}

#[derive(Debug, PartialEq)]
pub struct ControllerError(pub String);

impl fmt::Display for ControllerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ControllerError {}

pub const NAMES: &str = "thompson, thompson-calibrated, fixed:K, heuristic, confidence:P, off";

/// Builds a controller from its CLI name.
pub fn parse(name: &str, cfg: &ThompsonConfig) -> Result<Box<dyn Controller>, ControllerError> {
    let err = |m: String| Err(ControllerError(m));
    if cfg.k_max == 0 {
        return err(
            "--max-draft must be at least 1 (use --controller off for plain decoding)".into(),
        );
    }
    Ok(match name {
        "thompson" => Box::new(Thompson::new(cfg.clone())),
        "thompson-calibrated" => Box::new(CalibratedThompson::new(cfg.clone())),
        "heuristic" => Box::new(Heuristic::new(cfg.k_max)),
        "off" => Box::new(Fixed(0)),
        _ => {
            if let Some(k) = name.strip_prefix("fixed:") {
                match k.parse::<usize>() {
                    Ok(0) => return err("fixed:K needs K >= 1 (K = 0 is --controller off)".into()),
                    Ok(k) if k > cfg.k_max => {
                        return err(format!("fixed:{k} exceeds --max-draft {}", cfg.k_max))
                    }
                    Ok(k) => Box::new(Fixed(k)),
                    Err(_) => return err(format!("fixed:K needs an integer K, got `{k}`")),
                }
            } else if let Some(p) = name.strip_prefix("confidence:") {
                match p.parse::<f32>() {
                    Ok(p) if (0.0..=1.0).contains(&p) => Box::new(Confidence {
                        p,
                        k_max: cfg.k_max,
                    }),
                    _ => return err(format!("confidence:P needs P in [0, 1], got `{p}`")),
                }
            } else {
                return err(format!(
                    "unknown controller `{name}`; expected one of: {NAMES}"
                ));
            }
        }
    })
}

/// Refuses a `--max-draft` that cannot pay, and bounds it by what a generation of
/// `max_new_tokens` can use (never more drafts than tokens left after the first one).
pub fn draft_limit(max_draft: usize, max_new_tokens: usize) -> Result<usize, ControllerError> {
    if max_draft == 0 || max_draft > MAX_DRAFT_LIMIT {
        return Err(ControllerError(format!(
            "--max-draft {max_draft}: a round drafts at least 1 and at most {MAX_DRAFT_LIMIT} \
             tokens (verifying more than {} positions costs more with every extra row and \
             cannot pay)",
            MAX_DRAFT_LIMIT + 1
        )));
    }
    Ok(max_draft.min(max_new_tokens.saturating_sub(1)).max(1))
}

impl ThompsonConfig {
    /// The Beta prior warm-started from the head's held-out top-1 agreement when its training
    /// recorded one (worth 4 observations), else uniform.
    pub fn for_head(agreement: Option<f64>, k_max: usize, seed: u64) -> Self {
        let mut cfg = ThompsonConfig {
            k_max,
            seed,
            ..Default::default()
        };
        if let Some(alpha) = agreement {
            cfg.prior = (1.0 + 4.0 * alpha, 1.0 + 4.0 * (1.0 - alpha));
        }
        cfg
    }
}

/// The controller `name` for a run with or without a head (every controller but `off`
/// drafts with one), its Thompson prior from the head's `agreement`.
/// The head's held-out agreement, which warm-starts the Thompson prior.
pub fn agreement(head: Option<&eesd_core::head::EarlyExitHead>) -> Option<f64> {
    head.and_then(|h| h.spec.metrics.get("top1_agreement")?.as_f64())
}

pub fn build(
    name: &str,
    has_head: bool,
    agreement: Option<f64>,
    k_max: usize,
    seed: u64,
) -> Result<Box<dyn Controller>, ControllerError> {
    let controller = parse(name, &ThompsonConfig::for_head(agreement, k_max, seed))?;
    if !has_head && controller.drafts() {
        return Err(ControllerError(format!(
            "controller `{name}` drafts with an early-exit head: give --head DIR (or use --controller off)"
        )));
    }
    Ok(controller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_costs_price_a_sequences_drafts_at_the_pass_they_join() {
        let c = Costs {
            draft_step: 0.2,
            verify: vec![1.0, 1.05, 1.1, 1.15, 1.2],
        };
        let one = c.at_batch(1);
        assert_eq!((one.draft_step, &one.verify), (c.draft_step, &c.verify));
        // 8 rows cost 1.2 + 0.05 * 3 = 1.35 plain steps: one token is 1.35 / 8 of a step.
        let b = c.at_batch(8);
        let share = 1.35 / 8.0;
        assert!((b.draft_step - 0.2 / share).abs() < 1e-9);
        assert!((b.verify[1] - (1.0 + 0.05 / share)).abs() < 1e-9);
        assert!(b.verify.windows(2).all(|w| w[1] > w[0]));
        // At that price a head accepted 40% of the time is not worth a draft; alone it is.
        assert_eq!(best_k(0.4, &b, 0), 0);
        assert!(best_k(0.4, &c, 0) > 0);
    }
    use rand::Rng;

    /// Rounds of a Bernoulli(theta) acceptance stream: `accepted` = leading successes of k.
    fn simulate(
        c: &mut dyn Controller,
        theta: f64,
        rounds: usize,
        costs: &Costs,
        seed: u64,
    ) -> (f64, f64, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut tokens, mut cost) = (0.0, 0.0);
        let mut ks = Vec::new();
        for _ in 0..rounds {
            let mut k = c.plan(costs);
            let mut conf = Vec::new();
            if c.wants_confidence() {
                let planned = k;
                k = 0;
                for i in 1..=planned {
                    // a calibrated draft: its confidence is the acceptance probability
                    conf.push(theta as f32);
                    k = i;
                    match c.after_draft(i, theta as f32, costs) {
                        Next::Continue => {}
                        Next::Stop => break,
                        Next::StopDiscard => {
                            conf.pop();
                            k = i - 1;
                            break;
                        }
                    }
                }
            }
            let accepted = (0..k).take_while(|_| rng.random::<f64>() < theta).count();
            tokens += (accepted + 1) as f64;
            cost += costs.round(k);
            ks.push(k);
            c.observe(&Outcome {
                drafted: k,
                accepted,
                confidences: &conf,
            });
        }
        (tokens, cost, ks)
    }

    fn mean(v: &[usize]) -> f64 {
        v.iter().sum::<usize>() as f64 / v.len() as f64
    }

    #[test]
    fn expected_tokens_is_the_geometric_sum() {
        assert_eq!(expected_tokens(0.0, 5), 1.0);
        assert_eq!(expected_tokens(1.0, 5), 6.0);
        assert!((expected_tokens(0.5, 2) - 1.75).abs() < 1e-12);
    }

    #[test]
    fn posterior_arithmetic_is_censored_bernoulli() {
        let mut p = BetaPosterior::new((1.0, 1.0), 1.0);
        p.update(3, true); // 3 accepted then a rejection
        assert_eq!((p.a, p.b), (4.0, 2.0));
        p.update(5, false); // all 5 accepted, no failure observed
        assert_eq!((p.a, p.b), (9.0, 2.0));
        let mut d = BetaPosterior::new((1.0, 1.0), 0.5);
        d.update(4, false);
        d.update(0, false); // a plain round: only the discount toward the prior applies
        assert_eq!((d.a, d.b), (1.0 + 0.5 * 4.0, 1.0));
    }

    #[test]
    fn bounds_are_respected() {
        let costs = Costs::linear(0.1, 0.02, 8);
        for name in [
            "thompson",
            "thompson-calibrated",
            "heuristic",
            "fixed:3",
            "confidence:0.5",
            "off",
        ] {
            let cfg = ThompsonConfig {
                k_max: 6,
                ..Default::default()
            };
            let mut c = parse(name, &cfg).unwrap();
            for theta in [0.05, 0.5, 0.95] {
                let (_, _, ks) = simulate(c.as_mut(), theta, 300, &costs, 1);
                assert!(ks.iter().all(|&k| k <= 6), "{name}: {ks:?}");
            }
        }
        let mut c = Thompson::new(ThompsonConfig {
            allow_plain: false,
            ..Default::default()
        });
        let (_, _, ks) = simulate(&mut c, 0.0, 200, &Costs::linear(0.9, 0.5, 8), 2);
        assert!(ks.iter().all(|&k| k >= 1));
    }

    #[test]
    fn same_seed_same_decisions() {
        let costs = Costs::linear(0.2, 0.05, 8);
        let run = |seed| {
            let mut c = Thompson::new(ThompsonConfig {
                seed,
                ..Default::default()
            });
            simulate(&mut c, 0.6, 200, &costs, 9).2
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn draft_length_follows_acceptance() {
        let costs = Costs::linear(0.15, 0.03, 8);
        for name in ["thompson", "thompson-calibrated", "heuristic"] {
            let cfg = ThompsonConfig::default();
            let mut good = parse(name, &cfg).unwrap();
            let mut bad = parse(name, &cfg).unwrap();
            let (_, _, hi) = simulate(good.as_mut(), 0.9, 400, &costs, 3);
            let (_, _, lo) = simulate(bad.as_mut(), 0.2, 400, &costs, 3);
            let (hi, lo) = (mean(&hi[100..]), mean(&lo[100..]));
            assert!(
                hi > 3.0 && lo < 1.5 && hi > lo + 2.0,
                "{name}: mean K at 0.9 = {hi}, at 0.2 = {lo}"
            );
        }
        // After the stream turns bad, Beta-TS's draft length falls.
        let mut c = Thompson::new(ThompsonConfig::default());
        let (_, _, before) = simulate(&mut c, 0.9, 300, &costs, 4);
        let (_, _, after) = simulate(&mut c, 0.1, 1500, &costs, 5);
        assert!(mean(&after[1000..]) < mean(&before[200..]) - 2.0);
    }

    #[test]
    fn thompson_is_near_the_best_fixed_k_in_hindsight() {
        for (theta, c, slope) in [
            (0.9, 0.1, 0.02),
            (0.7, 0.15, 0.04),
            (0.4, 0.2, 0.05),
            (0.1, 0.3, 0.05),
        ] {
            let costs = Costs::linear(c, slope, 8);
            let best = (0..=8)
                .map(|k| expected_tokens(theta, k) / costs.round(k))
                .fold(f64::MIN, f64::max);
            let mut ts = Thompson::new(ThompsonConfig {
                seed: 11,
                ..Default::default()
            });
            let (tokens, cost, _) = simulate(&mut ts, theta, 4000, &costs, 12);
            let ratio = (tokens / cost) / best;
            assert!(
                ratio > 0.95,
                "theta {theta}: Beta-TS reaches {ratio:.3} of the best fixed K"
            );
        }
    }

    #[test]
    fn parse_refuses_bad_names() {
        let cfg = ThompsonConfig::default();
        assert!(parse("nope", &cfg)
            .unwrap_err()
            .0
            .contains("unknown controller"));
        assert!(parse("fixed:0", &cfg).unwrap_err().0.contains("K >= 1"));
        assert!(parse("fixed:x", &cfg).is_err());
        assert!(parse("fixed:99", &cfg).unwrap_err().0.contains("exceeds"));
        assert!(parse("confidence:2", &cfg).is_err());
        let zero = ThompsonConfig {
            k_max: 0,
            ..Default::default()
        };
        assert!(parse("thompson", &zero)
            .unwrap_err()
            .0
            .contains("at least 1"));
    }

    #[test]
    fn confidence_discards_the_unsure_token() {
        let mut c = parse("confidence:0.5", &ThompsonConfig::default()).unwrap();
        let costs = Costs::linear(0.1, 0.0, 8);
        assert_eq!(c.after_draft(1, 0.9, &costs), Next::Continue);
        assert_eq!(c.after_draft(2, 0.3, &costs), Next::StopDiscard);
    }
}

#[cfg(test)]
mod calibrated_tests {
    use super::*;
    use rand::Rng;

    /// Drafts whose confidence is their acceptance probability, spread over [0, 1]: the
    /// calibrated controller must learn to propose the confident ones and drop the rest.
    #[test]
    fn calibrated_proposes_confident_drafts_only() {
        let costs = Costs::linear(0.35, 0.05, 8);
        let mut c = CalibratedThompson::new(ThompsonConfig::default());
        let mut rng = StdRng::seed_from_u64(5);
        let (mut proposed_conf, mut proposed, mut rounds) = (0.0, 0usize, 0usize);
        for round in 0..3000 {
            let k_plan = c.plan(&costs);
            let mut confs = Vec::new();
            let mut accepted_flags = Vec::new();
            for i in 1..=k_plan {
                let conf: f32 = rng.random();
                let next = c.after_draft(i, conf, &costs);
                if next == Next::StopDiscard {
                    break;
                }
                confs.push(conf);
                accepted_flags.push(rng.random::<f32>() < conf);
                if next == Next::Stop {
                    break;
                }
            }
            let accepted = accepted_flags.iter().take_while(|&&a| a).count();
            c.observe(&Outcome {
                drafted: confs.len(),
                accepted,
                confidences: &confs,
            });
            if round >= 1000 {
                rounds += 1;
                proposed += confs.len();
                proposed_conf += confs.first().copied().unwrap_or(0.0) as f64;
            }
        }
        let rate = proposed as f64 / rounds as f64;
        assert!(rate > 0.3, "proposes {rate:.2} drafts per round");
        assert!(
            proposed_conf / rounds as f64 > 0.25,
            "mean confidence of first proposals too low"
        );
    }
}
