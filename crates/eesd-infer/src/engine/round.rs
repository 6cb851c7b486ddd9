//! One EESD round for a set of sequences (EESD.md section 2): each controller plans a draft
//! length (or the lookup proposes tokens copied from the text so far, which need no draft
//! steps), the drafts are made one step at a time (layers `[0, N)` and the head), the base
//! verifies every sequence's k+1 positions in one pass of `[N, L)`, and each sequence commits
//! its accepted prefix and the base's token, rolling its caches back to them. Every phase runs
//! the rows of all sequences through the backend together.

use super::backend::{Backend, Cache, Drafted, Rows};
use super::sequence::Sequence;
use super::Engine;
use crate::controller::{Costs, Next, Outcome};
use crate::verify::Verdict;
use eesd_core::Result;
use std::time::Instant;

/// One sequence's round so far.
pub struct Draft<B: Backend> {
    /// The pending token: the round's first input.
    pending: B::Token,
    /// Committed tokens in the base cache before the round (all but `pending`).
    committed_before: usize,
    planned: usize,
    /// Drafting has ended for this round (planned length reached, or the controller stopped).
    done: bool,
    /// Layer-N states of `pending`, d1, d2, ...
    lower: Vec<B::Hidden>,
    /// The proposed drafts d1..dk.
    tokens: Vec<B::Token>,
    /// Their processed distributions (sampling only).
    q: Vec<B::Probs>,
    confidences: Vec<f32>,
    /// The final state before the next draft's input: verified for `pending`, the head's own
    /// normed output (its stand-in) for the drafts after it.
    before: B::Hidden,
    /// Whether the verify ran `[0, N)` for the last input (a dropped draft already had).
    full_verify: bool,
    /// For drafts copied from the text ([`crate::lookup`]): the length of the match they
    /// continue. They run `[0, N)` with the verification, all k+1 positions at once.
    copied: Option<usize>,
}

impl<B: Backend> Draft<B> {
    /// The next token to run through `[0, N)`: the last draft, or `pending`.
    fn input(&self) -> &B::Token {
        self.tokens.last().unwrap_or(&self.pending)
    }
}

/// The round: plan, draft, verify, commit. Timings feed the cost model when one sequence
/// runs (a batch's rounds are priced by the batch, which the cost model does not yet know).
pub fn run<B: Backend>(engine: &mut Engine<B>, seqs: &mut [&mut Sequence<B>]) -> Result<()> {
    let b = &engine.backend;
    // Priced at this batch: a draft in a full batch costs what it adds to the shared pass.
    let costs = engine.costs.costs().at_batch(seqs.len());
    let timed =
        seqs.len() == 1 && (seqs[0].stats.rounds as u64).is_multiple_of(b.timing_interval());
    let k_max = engine.costs.k_max();
    let mut drafts: Vec<Draft<B>> = seqs.iter_mut().map(|s| plan(b, s, &costs, k_max)).collect();

    if timed {
        b.synchronize();
    }
    let t_draft = Instant::now();
    draft(b, seqs, &mut drafts, &costs)?;
    if timed {
        b.synchronize();
    }
    let draft_secs = t_draft.elapsed().as_secs_f64();

    let t_verify = Instant::now();
    let verdicts = verify(b, seqs, &mut drafts)?;
    let verify_secs = t_verify.elapsed().as_secs_f64();
    if timed && drafts[0].full_verify && drafts[0].copied.is_none() {
        let k = drafts[0].tokens.len();
        let per_draft = (k > 0).then(|| draft_secs / k as f64);
        engine.costs.observe_round(k, per_draft, verify_secs);
    }

    let check = engine.check_invariants;
    for ((s, d), (v, finals)) in seqs.iter_mut().zip(drafts).zip(verdicts) {
        commit(&engine.backend, s, d, v, finals, check)?;
    }
    Ok(())
}

/// The round's drafts: copied ones when the lookup finds a match worth verifying, else the
/// controller's length of head drafts; never past the token limit or the context.
fn plan<B: Backend>(b: &B, s: &mut Sequence<B>, costs: &Costs, k_max: usize) -> Draft<B> {
    let room = s.room().min(k_max);
    let copied = s
        .lookup
        .as_mut()
        .and_then(|l| l.policy.plan(&l.index, costs, room));
    let planned = match (&copied, s.head_cache.is_some()) {
        (Some(p), _) => p.tokens.len(),
        (None, true) => s.controller.plan(costs).min(room),
        (None, false) => 0,
    };
    let mut d = Draft {
        pending: b.token(s.pending),
        committed_before: s.cache.positions(),
        planned,
        done: planned == 0,
        lower: Vec::with_capacity(planned + 1),
        tokens: Vec::with_capacity(planned),
        q: Vec::new(),
        confidences: Vec::new(),
        before: s.prev_final.share(),
        full_verify: true,
        copied: None,
    };
    if let Some(p) = copied {
        d.tokens = p.tokens.iter().map(|&t| b.token(t)).collect();
        if !s.opts.sampling.is_greedy() {
            d.q = d.tokens.iter().map(|t| b.point_mass(t)).collect();
        }
        d.copied = Some(p.ngram);
        d.done = true;
    }
    d
}

/// Draft steps until every sequence has its drafts: each step runs one token per drafting
/// sequence through `[0, N)`, then its backlog through the head, and picks the next draft.
fn draft<B: Backend>(
    b: &B,
    seqs: &mut [&mut Sequence<B>],
    ds: &mut [Draft<B>],
    costs: &Costs,
) -> Result<()> {
    let reads_finals = b.spec().head_reads_finals;
    for i in 1.. {
        if ds.iter().all(|d| d.done) {
            return Ok(());
        }
        // [0, N) for each drafting sequence's last input; the state joins its head backlog.
        let (tokens, mut caches): (Vec<_>, Vec<_>) = seqs
            .iter_mut()
            .zip(ds.iter())
            .filter(|(_, d)| !d.done)
            .map(|(s, d)| (d.input(), &mut s.cache))
            .unzip();
        let states = b.lower(&tokens, &mut caches)?;
        let mut inputs = Vec::new(); // (backlog states, their previous final states)
        let drafting = seqs.iter_mut().zip(ds.iter_mut()).filter(|(_, d)| !d.done);
        for ((s, d), h) in drafting.zip(states) {
            let prev = reads_finals.then(|| d.before.share());
            s.backlog.push((h.share(), prev));
            d.lower.push(h);
            let backlog = std::mem::take(&mut s.backlog);
            let hs: Vec<&B::Hidden> = backlog.iter().map(|(h, _)| h).collect();
            let prevs: Option<Vec<&B::Hidden>> = backlog.iter().map(|(_, p)| p.as_ref()).collect();
            inputs.push((Rows::cat(&hs), prevs.map(|p| Rows::cat(&p))));
        }
        // The head over every drafting sequence's backlog: draft logits of its last row.
        let mut head_caches: Vec<&mut B::Cache> = seqs
            .iter_mut()
            .zip(ds.iter())
            .filter(|(_, d)| !d.done)
            .map(|(s, _)| {
                s.head_cache
                    .as_mut()
                    .expect("a drafting sequence has a head cache")
            })
            .collect();
        let hs: Vec<&B::Hidden> = inputs.iter().map(|(h, _)| h).collect();
        let prevs: Vec<Option<&B::Hidden>> = inputs.iter().map(|(_, p)| p.as_ref()).collect();
        let outs = b.draft(&hs, &prevs, &mut head_caches)?;
        let drafting = seqs.iter_mut().zip(ds.iter_mut()).filter(|(_, d)| !d.done);
        for ((s, d), (logits, normed)) in drafting.zip(outs) {
            d.before = normed;
            let want_confidence = s.controller.wants_confidence();
            let Drafted {
                token,
                confidence,
                q,
            } = b.choose_draft(&logits, &s.opts.sampling, want_confidence)?;
            let mut next = Next::Continue;
            if want_confidence {
                let conf = confidence.unwrap_or(1.0);
                next = s.controller.after_draft(i, conf, costs);
                if next == Next::StopDiscard {
                    d.done = true;
                    continue;
                }
                d.confidences.push(conf);
            }
            if let Some(q) = q.filter(|_| !s.opts.sampling.is_greedy()) {
                d.q.push(q);
            }
            d.tokens.push(token);
            d.done = next == Next::Stop || i == d.planned;
        }
    }
    unreachable!("the loop returns once every draft is done")
}

/// The base's verdict on each sequence's drafts: the last proposed token (or `pending` when
/// nothing was drafted) still needs `[0, N)`; then `[N, L)` runs once over the k+1 saved
/// layer-N states. Returns each verdict with the verified final states.
fn verify<B: Backend>(
    b: &B,
    seqs: &mut [&mut Sequence<B>],
    ds: &mut [Draft<B>],
) -> Result<Vec<(Verdict, B::Hidden)>> {
    for d in ds.iter_mut() {
        d.full_verify = d.copied.is_none() && d.lower.len() == d.tokens.len();
    }
    // Copied drafts: `pending` and every draft through [0, N) in one pass.
    let (inputs, mut caches): (Vec<Vec<&B::Token>>, Vec<_>) = seqs
        .iter_mut()
        .zip(ds.iter())
        .filter(|(_, d)| d.copied.is_some())
        .map(|(s, d)| {
            let input = std::iter::once(&d.pending).chain(&d.tokens).collect();
            (input, &mut s.cache)
        })
        .unzip();
    if !inputs.is_empty() {
        let slices: Vec<&[&B::Token]> = inputs.iter().map(|v| &v[..]).collect();
        let states = b.lower_many(&slices, &mut caches)?;
        for (d, h) in ds.iter_mut().filter(|d| d.copied.is_some()).zip(states) {
            d.lower = (0..h.rows()).map(|i| h.row(i)).collect();
        }
    }
    let (tokens, mut caches): (Vec<_>, Vec<_>) = seqs
        .iter_mut()
        .zip(ds.iter())
        .filter(|(_, d)| d.full_verify)
        .map(|(s, d)| (d.input(), &mut s.cache))
        .unzip();
    let states = b.lower(&tokens, &mut caches)?;
    for (d, h) in ds.iter_mut().filter(|d| d.full_verify).zip(states) {
        d.lower.push(h);
    }
    let rows: Vec<B::Hidden> = ds
        .iter()
        .map(|d| Rows::cat(&d.lower.iter().collect::<Vec<_>>()))
        .collect();
    let mut caches: Vec<&mut B::Cache> = seqs.iter_mut().map(|s| &mut s.cache).collect();
    let outs = b.upper(&rows.iter().collect::<Vec<_>>(), &mut caches)?; // [k+1, V] each
    outs.into_iter()
        .zip(ds.iter())
        .zip(seqs.iter())
        .map(|(((logits, finals), d), s)| {
            let v = b.judge(&logits, &d.tokens, &d.q, &s.opts.sampling)?;
            Ok((v, finals))
        })
        .collect()
}

/// Commits the accepted drafts and the base's token, rolls every cache back to them, and lets
/// the controller learn how the round went.
fn commit<B: Backend>(
    b: &B,
    s: &mut Sequence<B>,
    d: Draft<B>,
    v: Verdict,
    finals: B::Hidden,
    check: bool,
) -> Result<()> {
    let (k, a) = (d.tokens.len(), v.accepted);
    let accepted = b.token_ids(&d.tokens[..a])?;
    let keep = d.committed_before + 1 + a; // pending + accepted drafts
    s.cache.roll_back(keep);
    let reads_finals = b.spec().head_reads_finals;
    if let Some(hc) = s.head_cache.as_mut() {
        hc.roll_back(keep);
        // Committed tokens that neither the head cache nor the backlog covers yet (the last
        // draft when all were accepted, or `pending` in a round without drafts) join the
        // backlog; the head runs them with its next draft step.
        let backlog: usize = s.backlog.iter().map(|(h, _)| h.rows()).sum();
        let covered = hc.positions() + backlog - d.committed_before;
        for j in covered..=a {
            // Verified now: row j's previous position is `pending`'s predecessor (j = 0) or
            // verified row j - 1.
            let prev = reads_finals.then(|| match j {
                0 => s.prev_final.share(),
                _ => finals.row(j - 1),
            });
            s.backlog.push((d.lower[j].share(), prev));
        }
    }
    if reads_finals {
        s.prev_final = finals.row(a);
    }
    s.stats.record_round(k, a);
    match (d.copied, s.lookup.as_mut()) {
        (Some(ngram), Some(l)) => {
            l.policy.observe(ngram, k, a);
            s.stats.record_copied(k, a);
        }
        _ => s.controller.observe(&Outcome {
            drafted: k,
            accepted: a,
            confidences: &d.confidences,
        }),
    }
    if check {
        s.check_invariant(keep);
    }
    // Emit the accepted drafts (an EOS among them ends the sequence), then the base's token.
    for t in accepted {
        s.push(t);
        if s.stop.is_some() {
            return Ok(());
        }
    }
    s.push(v.next_token);
    Ok(())
}
