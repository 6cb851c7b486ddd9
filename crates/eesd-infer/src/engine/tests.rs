//! The round against a fake backend, without a model: a "model" whose next token is a hash of
//! the whole context and a head that drafts it right or wrong by a rule, with caches that
//! record the tokens at each position. Every fake call checks what a real backend only gets
//! wrong silently: rows arrive at the next free position, each layer's cache agrees with the
//! context the row was computed from (a stale rollback would not), a final-state head is given
//! the state of the position just before each row, and no cache outgrows its capacity. Output
//! is compared with an independent plain loop over the same rule.

use super::*;
use crate::controller::{parse, ThompsonConfig};
use crate::verify::Verdict;
use eesd_core::sampling::SamplingParams;
use std::cell::RefCell;

const VOCAB: u32 = 50;
const EOS: u32 = 0;

/// The fake model's greedy token after `ctx`: EOS once the context has `eos_at` tokens.
fn base_next(ctx: &[u32], eos_at: Option<usize>, period: Option<usize>) -> u32 {
    if Some(ctx.len()) == eos_at {
        return EOS;
    }
    // A model that mostly repeats the token `period` back (text that copies itself, what
    // copied drafts are for), except at every 7th position.
    if let Some(p) = period.filter(|&p| ctx.len() >= p && ctx.len() % 7 != 3) {
        return ctx[ctx.len() - p];
    }
    let h = ctx.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x0100_0000_01b3)
    });
    1 + (h % (VOCAB as u64 - 1)) as u32
}

/// Positions whose next token the head drafts wrong (with low confidence).
type Wrong = fn(usize) -> bool;

#[derive(Clone, Debug)]
struct Row {
    pos: usize,
    /// The tokens at positions `0..=pos` this state was computed from.
    ctx: Vec<u32>,
}

#[derive(Clone, Debug)]
struct FakeRows(Vec<Row>);

impl Rows for FakeRows {
    fn rows(&self) -> usize {
        self.0.len()
    }
    fn row(&self, i: usize) -> Self {
        FakeRows(vec![self.0[i].clone()])
    }
    fn cat(parts: &[&Self]) -> Self {
        FakeRows(parts.iter().flat_map(|p| p.0.iter().cloned()).collect())
    }
    fn share(&self) -> Self {
        self.clone()
    }
}

/// Tokens per layer, by position.
struct FakeCache {
    layers: Vec<Vec<u32>>,
    capacity: usize,
}

impl Cache for FakeCache {
    fn positions(&self) -> usize {
        self.layers[0].len()
    }
    fn uniform_positions(&self) -> Option<usize> {
        let n = self.layers[0].len();
        self.layers.iter().all(|l| l.len() == n).then_some(n)
    }
    fn roll_back(&mut self, len: usize) {
        for l in &mut self.layers {
            l.truncate(len);
        }
    }
}

impl FakeCache {
    /// Writes `token` at `pos` of `layer`, checking the layer holds exactly `ctx` before it.
    fn write(&mut self, layer: usize, row: &Row) {
        let l = &mut self.layers[layer];
        assert_eq!(
            l.len(),
            row.pos,
            "layer {layer}: a row must arrive at the next position"
        );
        assert_eq!(
            l[..],
            row.ctx[..row.pos],
            "layer {layer}: stale cache under the row"
        );
        l.push(row.ctx[row.pos]);
        assert!(
            l.len() <= self.capacity,
            "layer {layer} overflows its capacity"
        );
    }
}

/// Greedy token ids per row, and the draft's confidence.
struct FakeLogits {
    ids: Vec<u32>,
    confidence: f32,
}

struct Fake {
    context: usize,
    eos_at: Option<usize>,
    /// The base repeats the token this far back (see [`base_next`]).
    period: Option<usize>,
    wrong: Wrong,
    reads_finals: bool,
    /// Rows of every `upper` call, per sequence (to see batching).
    upper_calls: RefCell<Vec<Vec<usize>>>,
}

impl Fake {
    fn new(context: usize, wrong: Wrong) -> Self {
        Fake {
            context,
            eos_at: None,
            period: None,
            wrong,
            reads_finals: false,
            upper_calls: RefCell::new(Vec::new()),
        }
    }
}

impl Backend for Fake {
    type Hidden = FakeRows;
    type Token = u32;
    type Logits = FakeLogits;
    type Probs = ();
    type Cache = FakeCache;

    fn spec(&self) -> ModelSpec {
        ModelSpec {
            context: self.context,
            vocab: VOCAB as usize,
            has_head: true,
            head_reads_finals: self.reads_finals,
        }
    }
    fn verify_width(&self) -> Option<usize> {
        None
    }

    fn new_caches(
        &self,
        prompt: usize,
        max_new: usize,
        drafting: bool,
    ) -> (FakeCache, Option<FakeCache>) {
        let capacity = self.context.min(prompt + max_new) + 1;
        let cache = |n| FakeCache {
            layers: vec![Vec::new(); n],
            capacity,
        };
        (cache(2), drafting.then(|| cache(1)))
    }

    fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut FakeCache,
        head_cache: Option<&mut FakeCache>,
    ) -> Result<(FakeLogits, FakeRows)> {
        for l in &mut cache.layers {
            l.extend_from_slice(prompt);
        }
        if let Some(hc) = head_cache {
            hc.layers[0].extend_from_slice(prompt);
        }
        let last = Row {
            pos: prompt.len() - 1,
            ctx: prompt.to_vec(),
        };
        let logits = FakeLogits {
            ids: vec![base_next(prompt, self.eos_at, self.period)],
            confidence: 1.0,
        };
        Ok((logits, FakeRows(vec![last])))
    }

    fn token(&self, id: u32) -> u32 {
        id
    }
    fn token_ids(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(tokens.to_vec())
    }

    fn lower(&self, tokens: &[&u32], caches: &mut [&mut FakeCache]) -> Result<Vec<FakeRows>> {
        Ok(tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(&&t, c)| {
                let mut ctx = c.layers[0].clone();
                ctx.push(t);
                let row = Row {
                    pos: ctx.len() - 1,
                    ctx,
                };
                c.write(0, &row);
                FakeRows(vec![row])
            })
            .collect())
    }

    fn lower_many(
        &self,
        tokens: &[&[&u32]],
        caches: &mut [&mut FakeCache],
    ) -> Result<Vec<FakeRows>> {
        Ok(tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(ts, c)| {
                let rows = ts.iter().map(|&t| self.lower(&[t], &mut [&mut **c]));
                FakeRows(rows.flat_map(|r| r.unwrap().remove(0).0).collect())
            })
            .collect())
    }

    fn upper(
        &self,
        states: &[&FakeRows],
        caches: &mut [&mut FakeCache],
    ) -> Result<Vec<(FakeLogits, FakeRows)>> {
        self.upper_calls
            .borrow_mut()
            .push(states.iter().map(|s| s.rows()).collect());
        Ok(states
            .iter()
            .zip(caches.iter_mut())
            .map(|(s, c)| {
                for row in &s.0 {
                    c.write(1, row);
                }
                let ids =
                    s.0.iter()
                        .map(|r| base_next(&r.ctx, self.eos_at, self.period))
                        .collect();
                (
                    FakeLogits {
                        ids,
                        confidence: 1.0,
                    },
                    (*s).clone(),
                )
            })
            .collect())
    }

    fn draft(
        &self,
        states: &[&FakeRows],
        prev: &[Option<&FakeRows>],
        head_caches: &mut [&mut FakeCache],
    ) -> Result<Vec<(FakeLogits, FakeRows)>> {
        Ok(states
            .iter()
            .zip(prev)
            .zip(head_caches.iter_mut())
            .map(|((s, p), c)| {
                if self.reads_finals {
                    let p = p.expect("a final-state head is given the previous final states");
                    assert_eq!(p.rows(), s.rows());
                    for (r, q) in s.0.iter().zip(&p.0) {
                        assert_eq!(q.pos + 1, r.pos, "the final state of the position before");
                        assert_eq!(q.ctx[..], r.ctx[..r.pos], "a final state of this context");
                    }
                }
                for row in &s.0 {
                    c.write(0, row);
                }
                let last = s.0.last().expect("a row").clone();
                let right = base_next(&last.ctx, self.eos_at, self.period);
                let wrong = (self.wrong)(last.pos + 1);
                let logits = FakeLogits {
                    ids: vec![if wrong {
                        1 + right % (VOCAB - 1)
                    } else {
                        right
                    }],
                    confidence: if wrong { 0.1 } else { 0.9 },
                };
                (logits, FakeRows(vec![last]))
            })
            .collect())
    }

    fn first_token(&self, logits: &FakeLogits, _: &SamplingParams) -> Result<u32> {
        Ok(logits.ids[0])
    }

    fn choose_draft(
        &self,
        logits: &FakeLogits,
        s: &SamplingParams,
        conf: bool,
    ) -> Result<Drafted<Self>> {
        assert!(s.is_greedy(), "the fake backend is greedy only");
        Ok(Drafted {
            token: logits.ids[0],
            confidence: conf.then_some(logits.confidence),
            q: None,
        })
    }

    fn point_mass(&self, _: &u32) {}

    fn judge(
        &self,
        logits: &FakeLogits,
        drafts: &[u32],
        _: &[()],
        _: &SamplingParams,
    ) -> Result<Verdict> {
        assert_eq!(
            logits.ids.len(),
            drafts.len() + 1,
            "k + 1 verified positions"
        );
        let accepted = drafts
            .iter()
            .zip(&logits.ids)
            .take_while(|(d, t)| d == t)
            .count();
        Ok(Verdict {
            proposed: drafts.len(),
            accepted,
            next_token: logits.ids[accepted],
        })
    }
}

/// The plain loop the engine must reproduce.
fn reference(
    prompt: &[u32],
    max_new: usize,
    context: usize,
    eos_at: Option<usize>,
    period: Option<usize>,
) -> (Vec<u32>, StopReason) {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let t = base_next(&ctx, eos_at, period);
        ctx.push(t);
        out.push(t);
        if t == EOS {
            return (out, StopReason::Eos);
        }
        if out.len() >= max_new {
            return (out, StopReason::MaxNewTokens);
        }
        if ctx.len() >= context {
            return (out, StopReason::ContextFull);
        }
    }
}

fn opts(max_new: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new,
        sampling: SamplingParams::default(),
        eos_ids: vec![EOS],
    }
}

fn engine(fake: Fake) -> Engine<Fake> {
    let mut e = Engine::new(fake, 6);
    e.check_invariants = true;
    e
}

fn controller(name: &str) -> Box<dyn Controller> {
    let cfg = ThompsonConfig {
        k_max: 6,
        ..Default::default()
    };
    parse(name, &cfg).unwrap()
}

const PROMPT: &[u32] = &[7, 3, 11, 5];

/// Runs `name` on the fake and checks the output against the plain loop.
fn check(fake: Fake, name: &str, max_new: usize) -> Generation {
    check_with(fake, name, max_new, DraftSources::HEAD)
}

/// [`check`] with the given draft sources.
fn check_with(fake: Fake, name: &str, max_new: usize, sources: DraftSources) -> Generation {
    let (context, eos_at, period) = (fake.context, fake.eos_at, fake.period);
    let mut e = engine(fake);
    e.sources = sources;
    let mut c = controller(name);
    let mut streamed = Vec::new();
    let g = e
        .generate(PROMPT, &opts(max_new), c.as_mut(), |ids| {
            streamed.push(ids.len())
        })
        .unwrap();
    let (want, stop) = reference(PROMPT, max_new, context, eos_at, period);
    assert_eq!(g.ids, want, "{name}");
    assert_eq!(g.stop, stop, "{name}");
    assert_eq!(
        streamed,
        (1..=want.len()).collect::<Vec<_>>(),
        "one callback per token"
    );
    g
}

/// Drafts copied from the text: accepted runs, rejections (the base breaks the pattern every
/// 7th position), alone and mixed with head rounds, at the context and token limits; the
/// output is the plain loop's and every cache stays consistent (checked after each round).
#[test]
fn copied_drafts_keep_the_output_and_the_caches() {
    let both = DraftSources {
        head: true,
        lookup: true,
    };
    let lookup = DraftSources {
        head: false,
        lookup: true,
    };
    for sources in [lookup, both] {
        for name in ["thompson", "fixed:3", "thompson-calibrated"] {
            for (context, max_new) in [(512, 60), (40, 100), (512, 13)] {
                let mut fake = Fake::new(context, |p| p % 3 == 0);
                fake.period = Some(5);
                let g = check_with(fake, name, max_new, sources);
                let s = &g.stats;
                let what = format!("{} {name} context {context}: {s:?}", sources.name());
                assert!(s.copied_rounds > 0 && s.copied_accepted > 0, "{what}");
                assert!(
                    s.copied_accepted < s.copied_drafted,
                    "some rejected: {what}"
                );
                if !sources.head {
                    assert_eq!(s.copied_drafted, s.drafted, "only copied drafts: {what}");
                }
            }
        }
    }
}

#[test]
fn all_drafts_accepted() {
    let g = check(Fake::new(512, |_| false), "fixed:4", 41);
    let s = &g.stats;
    assert_eq!(s.accepted, s.drafted);
    // 40 tokens after the first, 5 per round (4 drafts + the bonus), the last rounds shorter.
    assert_eq!(s.rounds, 8, "{s:?}");
}

#[test]
fn a_rejection_at_each_position() {
    // The first round's pending token sits at position 4 (after the 4-token prompt); draft i
    // predicts position 4 + i. One wrong draft at each of the four positions in turn.
    let first_round: [Wrong; 4] = [|p| p == 5, |p| p == 6, |p| p == 7, |p| p == 8];
    for (i, wrong) in first_round.into_iter().enumerate() {
        let g = check(Fake::new(512, wrong), "fixed:4", 30);
        let s = &g.stats;
        // Only the first round rejects: draft i + 1 and the untested ones after it.
        assert_eq!(s.drafted - s.accepted, 4 - i, "draft {}: {s:?}", i + 1);
        let by_position = s.accepted_by_position();
        assert!(by_position[i] < 1.0, "draft {}: {by_position:?}", i + 1);
        assert!(by_position[..i].iter().all(|&a| a == 1.0));
    }
    // Wrong drafts all along, at a period that meets every draft position.
    for name in [
        "fixed:4",
        "fixed:1",
        "thompson",
        "heuristic",
        "thompson-calibrated",
    ] {
        let g = check(Fake::new(512, |p| p % 3 == 0), name, 40);
        if name.starts_with("fixed") {
            assert!(
                g.stats.accepted < g.stats.drafted,
                "{name}: some drafts fail"
            );
        }
    }
    // Every draft wrong: each round commits only the base's token.
    let g = check(Fake::new(512, |_| true), "fixed:3", 20);
    assert_eq!((g.stats.accepted, g.stats.rounds), (0, 19));
}

#[test]
fn an_unsure_draft_is_discarded_before_verification() {
    // confidence:0.5 drops every wrong draft (confidence 0.1) without proposing it
    // (StopDiscard), so every proposed draft is right.
    let g = check(Fake::new(512, |p| p % 3 == 0), "confidence:0.5", 40);
    assert!(g.stats.drafted > 0);
    assert_eq!(g.stats.accepted, g.stats.drafted, "{:?}", g.stats);
    // A first draft dropped: the round is a plain step whose input already went through [0, N).
    let g = check(Fake::new(512, |p| p % 2 == 0), "confidence:0.5", 30);
    assert_eq!(g.stats.accepted, g.stats.drafted);
}

#[test]
fn eos_inside_accepted_drafts_ends_the_generation_there() {
    let mut fake = Fake::new(512, |_| false);
    fake.eos_at = Some(PROMPT.len() + 9); // the 10th new token is EOS
    let g = check(fake, "fixed:6", 40);
    assert_eq!(g.ids.len(), 10);
    assert_eq!(g.stop, StopReason::Eos);
}

#[test]
fn drafts_stop_at_the_context_and_the_token_limit() {
    for name in ["fixed:6", "fixed:4", "thompson"] {
        // The context fills after 13 new tokens; drafts never run past it (the fake's caches
        // refuse to outgrow their capacity).
        let g = check(Fake::new(PROMPT.len() + 13, |_| false), name, 100);
        assert_eq!((g.ids.len(), g.stop), (13, StopReason::ContextFull));
        // Nor past the token limit.
        let g = check(Fake::new(512, |_| false), name, 9);
        assert_eq!(g.ids.len(), 9);
    }
}

#[test]
fn a_final_state_head_gets_the_state_before_each_row() {
    for wrong in [(|_| false) as Wrong, |p| p % 3 == 1, |p| p % 2 == 0] {
        for name in ["fixed:4", "fixed:1", "confidence:0.5", "off", "thompson"] {
            let mut fake = Fake::new(512, wrong);
            fake.reads_finals = true;
            check(fake, name, 30);
        }
    }
}

#[test]
fn a_batch_runs_every_sequence_in_one_pass_per_round() {
    let names = ["fixed:4", "off", "thompson", "confidence:0.5", "fixed:1"];
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|i| (0..3 + i).map(|t| 1 + t * 7 + i).collect())
        .collect();
    let max_new = |i: usize| 10 + 7 * i;
    let mut e = engine(Fake::new(512, |p| p % 4 == 0));
    let requests = (0..5)
        .map(|i| Request {
            prompt: &prompts[i],
            opts: opts(max_new(i)),
            controller: controller(names[i]),
        })
        .collect();
    let got = e.generate_batch(requests).unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(
            g.ids,
            reference(&prompts[i], max_new(i), 512, None, None).0,
            "sequence {i}"
        );
    }
    let calls = e.backend.upper_calls.borrow();
    assert_eq!(
        calls[0].len(),
        5,
        "the first round verifies all five together: {calls:?}"
    );
    // A sequence that stopped takes no more rows.
    assert!(
        calls.windows(2).all(|w| w[1].len() <= w[0].len()),
        "{calls:?}"
    );
    assert!(calls.last().unwrap().len() < 5, "{calls:?}");
}

#[test]
fn zero_new_tokens_and_bad_prompts() {
    let mut e = engine(Fake::new(16, |_| false));
    let g = e
        .generate(PROMPT, &opts(0), &mut crate::controller::Fixed(2), |_| {})
        .unwrap();
    assert!(g.ids.is_empty());
    assert!(e
        .generate(&[], &opts(4), &mut crate::controller::Fixed(2), |_| {})
        .is_err());
    let long: Vec<u32> = (0..16).map(|t| 1 + t % 7).collect();
    assert!(e
        .generate(&long, &opts(4), &mut crate::controller::Fixed(2), |_| {})
        .is_err());
    assert!(e
        .generate(&[VOCAB], &opts(4), &mut crate::controller::Fixed(2), |_| {})
        .is_err());
}
