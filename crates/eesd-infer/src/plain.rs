//! Plain autoregressive decoding: one full forward pass per token. The baseline every
//! speedup is measured against, and the reference the speculative path must equal.

use crate::speculative::{Engine, Prologue};
use crate::stats::DecodeStats;
use eesd_core::device::synchronize;
pub use eesd_core::generate::{check_prompt, generate_batch, GenerateOptions, StopReason};
use eesd_core::Result;
use std::time::Instant;
use tch::Kind;

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, EOS included when it ended the generation.
    pub ids: Vec<u32>,
    pub stop: StopReason,
    pub stats: DecodeStats,
}

impl Generation {
    /// Nothing generated: zero new tokens were asked for.
    pub fn empty(prompt_tokens: usize) -> Self {
        Generation {
            ids: Vec::new(),
            stop: StopReason::MaxNewTokens,
            stats: DecodeStats {
                prompt_tokens,
                ..Default::default()
            },
        }
    }
}

/// Generates up to `opts.max_new_tokens` after `prompt` with a single sequence, through
/// `engine`'s kernels (its head, if any, is not used). `on_token` sees the generated ids so far
/// after each new one (for streaming).
pub fn generate(
    engine: &Engine,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&[u32]),
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    let model = engine.base;
    let ctx = model.cfg.max_position_embeddings;
    let device = model.device;
    // Prefill: the whole prompt in one pass gives the first new token.
    let Some(Prologue {
        mut cache,
        mut stats,
        first: mut next,
        ..
    }) = engine.prologue(prompt, opts, false)?
    else {
        return Ok(Generation::empty(prompt.len()));
    };
    let mut ids: Vec<u32> = Vec::with_capacity(opts.max_new_tokens);
    let mut token = next.int64_value(&[0]) as u32;

    // Decode: one token in, one token out, until EOS, the limit or a full context.
    let _threads = engine.decode_threads();
    let t1 = Instant::now();
    let stop = loop {
        ids.push(token);
        on_token(&ids);
        if opts.eos_ids.contains(&token) {
            break StopReason::Eos;
        }
        if ids.len() >= opts.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        // Like HF's max_length: prompt plus output never exceed the context.
        if prompt.len() + ids.len() >= ctx {
            break StopReason::ContextFull;
        }
        let h = engine.embed_lower(&next.to_kind(Kind::Int64), &mut cache)?;
        let logits = engine.upper_logits(&h, &mut cache)?;
        next = opts.sampling.select(&logits);
        token = next.int64_value(&[0]) as u32;
    };
    synchronize(device);
    stats.decode_seconds = t1.elapsed().as_secs_f64();
    stats.new_tokens = ids.len();
    Ok(Generation { ids, stop, stats })
}
