//! What generation shares between the decoder and the trainer: the options, the stop reasons,
//! the prompt check, and batched plain generation (the trainer's teacher data), so that
//! eesd-train needs only this crate.

use crate::cache::KvCache;
use crate::model::Llama;
use crate::native::NativeModel;
use crate::sampling::SamplingParams;
use crate::{Error, Result};
use tch::Tensor;

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after emitting any of these (the token itself is kept, as in HF).
    pub eos_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxNewTokens,
    /// The model's context (`max_position_embeddings`) is full.
    ContextFull,
}

/// Checks a prompt against the model before any work: not empty, room for one new token.
pub fn check_prompt(model: &Llama, prompt: &[u32]) -> Result<()> {
    check_prompt_fits(
        prompt,
        model.cfg.max_position_embeddings,
        model.cfg.vocab_size,
    )
}

/// [`check_prompt`] for a context of `ctx` positions and a vocabulary of `vocab` tokens.
pub fn check_prompt_fits(prompt: &[u32], ctx: usize, vocab: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty (0 tokens)".into()));
    }
    if prompt.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens but the model's context is {ctx}: at most {} fit with one new token",
            prompt.len(),
            ctx - 1
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Generates for several prompts at once (left padding, one forward pass per step for the
/// whole batch): the teacher-data path, where throughput matters more than latency.
/// Returns each row's generated ids (EOS included when it ended the row).
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let _guard = tch::no_grad_guard();
    for p in prompts {
        check_prompt(model, p)?;
    }
    let b = prompts.len();
    let ctx = model.cfg.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = ctx.min(longest + opts.max_new_tokens.max(1));
    let pads: Vec<i64> = prompts.iter().map(|p| (longest - p.len()) as i64).collect();
    let mut flat: Vec<i64> = Vec::with_capacity(b * longest);
    for (p, &pad) in prompts.iter().zip(&pads) {
        flat.extend(std::iter::repeat_n(0, pad as usize));
        flat.extend(p.iter().map(|&t| t as i64));
    }
    let input = Tensor::from_slice(&flat)
        .view([b as i64, longest as i64])
        .to_device(model.device);
    let mut cache = model.new_cache(b as i64, capacity as i64);
    cache.set_left_padding(&pads);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![opts.max_new_tokens == 0; b];
    let mut logits = model.forward(&input, &mut cache).select(1, -1);
    let mut step = 0;
    while !done.iter().all(|&d| d) {
        let next = opts.sampling.select(&logits); // [B]
        let host = Vec::<i64>::try_from(next.to_device(tch::Device::Cpu))?;
        for (i, &t) in host.iter().enumerate() {
            if done[i] {
                continue;
            }
            out[i].push(t as u32);
            if opts.eos_ids.contains(&(t as u32)) || out[i].len() >= opts.max_new_tokens {
                done[i] = true;
            }
        }
        step += 1;
        if longest + step >= capacity {
            break; // context full for the longest row
        }
        logits = model
            .forward(&next.view([b as i64, 1]), &mut cache)
            .select(1, 0);
    }
    Ok(out)
}

/// Rows per native pass over a prompt (memory flat in its length; the bits do not depend on
/// the chunking).
pub const NATIVE_PREFILL_CHUNK: usize = 128;

/// Plain generation on the native CPU kernels (`nm` over `model`'s weights) for several
/// prompts: each prompt in chunks of [`NATIVE_PREFILL_CHUNK`] rows, then every unfinished
/// answer's next row in one pass (the weights are read once for all of them). A row's result
/// does not depend on the rows it shares a pass with, so each answer is the one the prompt
/// gets alone, and the one eesd-infer's native plain decoding gives: teacher data made here is
/// what the decoder will verify against. Returns each answer's ids (EOS included when it ended
/// the answer).
pub fn generate_native(
    nm: &NativeModel,
    model: &Llama,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    use crate::native::Segment;
    let _guard = tch::no_grad_guard();
    for p in prompts {
        check_prompt(model, p)?;
    }
    let (h, layers) = (nm.hidden(), model.num_layers());
    let ctx = model.cfg.max_position_embeddings;
    let capacity = |p: &[u32]| ctx.min(p.len() + opts.max_new_tokens.max(1));
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| model.new_cache(1, capacity(p) as i64))
        .collect();
    // Each prompt's last row after all layers: the next token's logits come from it.
    let mut last = vec![0f32; prompts.len() * h];
    for (i, (p, cache)) in prompts.iter().zip(&mut caches).enumerate() {
        for piece in p.chunks(NATIVE_PREFILL_CHUNK) {
            let mut x = nm.embed(piece);
            nm.forward_layers(&mut x, piece.len(), 0..layers, cache)?;
            last[i * h..(i + 1) * h].copy_from_slice(&x[(piece.len() - 1) * h..]);
        }
    }
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut live: Vec<usize> = if opts.max_new_tokens == 0 {
        Vec::new()
    } else {
        (0..prompts.len()).collect()
    };
    while !live.is_empty() {
        let logits = nm.logits(&last, live.len());
        let next = Vec::<i64>::try_from(opts.sampling.select(&logits))?;
        let mut going = Vec::with_capacity(live.len());
        for (&i, &t) in live.iter().zip(&next) {
            out[i].push(t as u32);
            let full = prompts[i].len() + out[i].len() >= capacity(&prompts[i]);
            if !(opts.eos_ids.contains(&(t as u32)) || out[i].len() >= opts.max_new_tokens || full)
            {
                going.push(i);
            }
        }
        live = going;
        if live.is_empty() {
            break;
        }
        let ids: Vec<u32> = live.iter().map(|&i| *out[i].last().unwrap()).collect();
        let mut x = nm.embed(&ids);
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| live.contains(i))
            .map(|(_, cache)| Segment { cache, rows: 1 })
            .collect();
        nm.forward_layers_batch(&mut x, &mut segs, 0..layers)?;
        last = x;
    }
    Ok(out)
}
