//! Early-exiting speculative decoding: draft with base layers `[0, N)` + the head, verify with
//! layers `[N, L)` over the saved layer-N hidden states, commit, roll back by truncation.
//!
//! Cache invariant (EESD.md section 2): every committed token passes once through `[0, N)`,
//! once through the head and once through `[N, L)`. Between rounds all base layers hold every
//! committed token but the last (the "pending" token, next round's first input); the head cache
//! plus `head_backlog` (layer-N states not yet run through the head, fed to it in one batch at
//! the next draft step) hold the same tokens.

use crate::controller::{Controller, Next, Outcome};
use crate::cost::CostTracker;
use crate::plain::{check_prompt, GenerateOptions, Generation, StopReason};
use crate::stats::DecodeStats;
use crate::verify::{accept_greedy, accept_sampled, Verdict};
use eesd_core::device::synchronize;
use eesd_core::head::EarlyExitHead;
use eesd_core::model::Llama;
use eesd_core::{Error, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The base model split at the exit layer, with its head.
pub struct Engine<'a> {
    pub base: &'a Llama,
    /// `None` decodes plainly (controller `off`) through the same code.
    pub head: Option<&'a EarlyExitHead>,
    /// N; 0 without a head.
    pub exit_layer: usize,
}

impl<'a> Engine<'a> {
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>) -> Self {
        let exit_layer = head.map(|h| h.spec.exit_layer).unwrap_or(0);
        Engine {
            base,
            head,
            exit_layer,
        }
    }

    /// Embedded tokens `[1, T, H]` through layers `[0, N)`.
    pub fn lower(&self, x: &Tensor, cache: &mut eesd_core::cache::KvCache) -> Tensor {
        self.base.forward_layers(x, 0..self.exit_layer, cache)
    }

    /// Layer-N states `[1, T, H]` through `[N, L)`, final norm and LM head: logits `[1, T, V]`.
    pub fn upper_logits(&self, h: &Tensor, cache: &mut eesd_core::cache::KvCache) -> Tensor {
        let b = self.base;
        b.logits(&b.final_norm(&b.forward_layers(h, self.exit_layer..b.num_layers(), cache)))
    }
}

/// Per-round options on top of plain generation's.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    pub gen: GenerateOptions,
    /// Measure round timings for the cost model every this many rounds (each such round
    /// synchronises the device twice; on CPU synchronising is free, so use 1 there).
    pub time_every: u64,
    /// Check the cache invariant after every round (on in debug builds and in tests).
    pub check_invariants: bool,
}

fn ids_tensor(ids: &[u32], device: Device) -> Tensor {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&v).to_device(device).unsqueeze(0)
}

/// Generates after `prompt`, with `controller` choosing each round's draft length.
pub fn generate(
    engine: &Engine,
    prompt: &[u32],
    opts: &SpecOptions,
    controller: &mut dyn Controller,
    costs: &mut CostTracker,
    mut on_token: impl FnMut(&[u32]),
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    let base = engine.base;
    check_prompt(base, prompt)?;
    let g = &opts.gen;
    let sampling = g.sampling;
    let (device, vocab) = (base.device, base.cfg.vocab_size as i64);
    let ctx = base.cfg.max_position_embeddings;
    let p_len = prompt.len();
    let capacity = (ctx.min(p_len + g.max_new_tokens.max(1)) + 1) as i64;
    let mut cache = base.new_cache(1, capacity);
    let mut head_cache = engine.head.map(|h| h.new_cache(base, 1, capacity));
    let mut stats = DecodeStats {
        prompt_tokens: p_len,
        ..Default::default()
    };
    let mut ids: Vec<u32> = Vec::with_capacity(g.max_new_tokens);
    if g.max_new_tokens == 0 {
        return Ok(Generation {
            ids,
            stop: StopReason::MaxNewTokens,
            stats,
        });
    }

    // Prefill: the prompt through every layer; its layer-N states wait for the head.
    synchronize(device);
    let t0 = Instant::now();
    let h_n = engine.lower(&base.embed(&ids_tensor(prompt, device)), &mut cache);
    let logits = engine.upper_logits(&h_n, &mut cache);
    let mut pending = sampling.select(&logits.select(1, -1)).int64_value(&[0]) as u32;
    let mut head_backlog: Vec<Tensor> = if engine.head.is_some() {
        vec![h_n]
    } else {
        vec![]
    };
    stats.prefill_seconds = t0.elapsed().as_secs_f64();

    let t_decode = Instant::now();
    let mut round: u64 = 0;
    let stop = loop {
        ids.push(pending);
        on_token(&ids);
        if g.eos_ids.contains(&pending) {
            break StopReason::Eos;
        }
        if ids.len() >= g.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        if p_len + ids.len() >= ctx {
            break StopReason::ContextFull;
        }
        // Never draft past the token limit or the context.
        let room = (g.max_new_tokens - ids.len()).min(ctx - p_len - ids.len()) - 1;
        let cost_model = costs.costs();
        let planned = if engine.head.is_some() {
            controller.plan(&cost_model).min(room).min(costs.k_max())
        } else {
            0
        };
        let timed = round.is_multiple_of(opts.time_every.max(1));
        let committed_before = cache.len(0); // every committed token but `pending`

        // Draft: each step runs one token through [0, N) and the head (plus any backlog).
        if timed {
            synchronize(device);
        }
        let t_draft = Instant::now();
        let mut lower_states: Vec<Tensor> = Vec::new(); // layer-N states of pending, d1, d2, ...
        let mut drafts: Vec<Tensor> = Vec::new(); // [1] i64 token ids
        let mut q_rows: Vec<Tensor> = Vec::new(); // [1, V] processed draft distributions
        let mut confidences: Vec<f32> = Vec::new();
        let mut input = Tensor::from_slice(&[pending as i64]).to_device(device);
        if let (Some(head), Some(hc)) = (engine.head, head_cache.as_mut()) {
            for i in 1..=planned {
                let h = engine.lower(&base.embed(&input.view([1, 1])), &mut cache);
                head_backlog.push(h.shallow_clone());
                lower_states.push(h);
                let backlog = Tensor::cat(&head_backlog, 1);
                head_backlog.clear();
                let draft_logits = head.forward(base, &backlog, hc).select(1, -1); // [1, V_d]
                let q = (!sampling.is_greedy() || controller.wants_confidence())
                    .then(|| sampling.probs(&draft_logits));
                let idx = match (&q, sampling.is_greedy()) {
                    (Some(q), false) => q.multinomial(1, false).squeeze_dim(1),
                    _ => draft_logits.argmax(-1, false),
                };
                let token = head.token_ids(&idx);
                let mut next = Next::Continue;
                if controller.wants_confidence() {
                    let conf = q
                        .as_ref()
                        .map(|q| q.max().double_value(&[]) as f32)
                        .unwrap_or(1.0);
                    confidences.push(conf);
                    next = controller.after_draft(i, conf, &cost_model);
                    if next == Next::StopDiscard {
                        confidences.pop();
                        break;
                    }
                }
                if !sampling.is_greedy() {
                    q_rows.push(head.to_full_vocab(q.as_ref().expect("q when sampling"), vocab));
                }
                drafts.push(token.shallow_clone());
                input = token;
                if next == Next::Stop {
                    break;
                }
            }
        }
        let k = drafts.len();
        if timed {
            synchronize(device);
        }
        let draft_secs = t_draft.elapsed().as_secs_f64();

        // Verify: the last proposed token (or `pending` when nothing was drafted) still needs
        // [0, N); then [N, L) runs once over the k+1 saved layer-N states.
        let t_verify = Instant::now();
        // A dropped draft (StopDiscard) already ran the last input through [0, N): this
        // verify is cheaper than v(k) measures, and its timing would skew the cost model.
        let full_verify = lower_states.len() == k;
        if full_verify {
            let h = engine.lower(&base.embed(&input.view([1, 1])), &mut cache);
            lower_states.push(h);
        }
        let logits = engine
            .upper_logits(&Tensor::cat(&lower_states, 1), &mut cache)
            .squeeze_dim(0); // [k+1, V]
        let draft_ids = if k > 0 {
            Tensor::cat(&drafts, 0)
        } else {
            Tensor::zeros([0], (Kind::Int64, device))
        };
        let verdict: Verdict = if sampling.is_greedy() {
            accept_greedy(&logits, &draft_ids)
        } else {
            let p = sampling.probs(&logits);
            let q = if k > 0 {
                Tensor::cat(&q_rows, 0)
            } else {
                Tensor::zeros([0, vocab], (Kind::Float, device))
            };
            let u = Tensor::rand([k as i64], (Kind::Float, device));
            accept_sampled(&p, &q, &draft_ids, &u)
        };
        let verify_secs = t_verify.elapsed().as_secs_f64();
        if timed && full_verify {
            if k > 0 {
                costs.draft_step.add(draft_secs / k as f64);
            }
            costs.verify[k].add(verify_secs);
        }

        // Commit the accepted drafts and the base's token; roll every cache back to them.
        let a = verdict.accepted;
        let draft_host: Vec<u32> = if a > 0 {
            Vec::<i64>::try_from(draft_ids.narrow(0, 0, a as i64).to_device(Device::Cpu))
                .map_err(Error::from)?
                .into_iter()
                .map(|t| t as u32)
                .collect()
        } else {
            vec![]
        };
        let keep = committed_before + 1 + a as i64; // pending + accepted drafts
        cache.truncate(keep);
        if let Some(hc) = head_cache.as_mut() {
            hc.truncate(keep);
            // Committed tokens that neither the head cache nor the backlog covers yet (the last
            // draft when all were accepted, or `pending` in a round without drafts) join the
            // backlog; the head runs them with its next draft step.
            let backlog_len: i64 = head_backlog.iter().map(|t| t.size()[1]).sum();
            let covered = (hc.len(0) + backlog_len - committed_before) as usize;
            for h in lower_states.iter().take(1 + a).skip(covered) {
                head_backlog.push(h.shallow_clone());
            }
        }
        stats.record_round(k, a);
        controller.observe(&Outcome {
            drafted: k,
            accepted: a,
            confidences: &confidences,
        });
        round += 1;
        if opts.check_invariants {
            check_invariant(
                &cache,
                head_cache.as_ref(),
                &head_backlog,
                p_len + ids.len() + a + 1,
            );
        }

        // Emit: accepted drafts (stopping at EOS), then the base's token becomes `pending`.
        let mut eos = false;
        for t in draft_host {
            ids.push(t);
            on_token(&ids);
            if g.eos_ids.contains(&t) {
                eos = true;
                break;
            }
        }
        if eos {
            break StopReason::Eos;
        }
        pending = verdict.next_token;
    };
    synchronize(device);
    stats.decode_seconds = t_decode.elapsed().as_secs_f64();
    stats.new_tokens = ids.len();
    Ok(Generation { ids, stop, stats })
}

/// All base layers hold the committed tokens but the pending one; the head cache plus its
/// backlog hold the same count. `committed` counts prompt and output, pending included.
fn check_invariant(
    cache: &eesd_core::cache::KvCache,
    head_cache: Option<&eesd_core::cache::KvCache>,
    backlog: &[Tensor],
    committed: usize,
) {
    let want = committed as i64 - 1;
    for (i, l) in cache.layers.iter().enumerate() {
        assert_eq!(
            l.len, want,
            "base layer {i} cache holds {} positions, expected {want}",
            l.len
        );
    }
    if let Some(hc) = head_cache {
        let backlog_len: i64 = backlog.iter().map(|t| t.size()[1]).sum();
        assert_eq!(hc.len(0) + backlog_len, want, "head cache + backlog");
    }
}
