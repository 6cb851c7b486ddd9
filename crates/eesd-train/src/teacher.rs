//! `eesd-train gen`: the frozen base model answers corpus prompts; its answers are the
//! distillation targets. Written in parquet parts of `--chunk` rows, each atomically, so a
//! killed run loses at most the part in flight and a re-run skips the ids already done.
//!
//! With `--reference-column` nothing is generated: the corpus's own answers (e.g. ShareGPT's
//! reference replies) become the responses, EAGLE's fixed-corpus mode. Distillation then learns
//! the base's own distribution at every position of that text (the targets come from the
//! base's forward pass, never from the text), at the cost of tokenising alone.

use anyhow::{bail, Context, Result};
use clap::Args;
use eesd_core::args::ModelArgs;
use eesd_core::corpus::{self, TeacherRow};
use eesd_core::generate::{generate_batch, generate_native, GenerateOptions};
use eesd_core::native::NativeModel;
use eesd_core::sampling::SamplingParams;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct GenArgs {
    /// The base model (`--model`, `--device`, `--dtype`).
    #[command(flatten)]
    pub base: ModelArgs,
    /// Prompt corpora: parquet files, folders or globs (repeat the flag for several).
    #[arg(long, required = true)]
    pub data: Vec<String>,
    /// The column holding the prompt text.
    #[arg(long, default_value = "prompt")]
    pub prompt_column: String,
    /// Take each response from this column instead of generating it (fixed-corpus mode; the
    /// text is tokenised and cut at --max-new-tokens).
    #[arg(long)]
    pub reference_column: Option<String>,
    /// Output folder of parquet parts (created; re-running resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// Take at most this many prompts from each --data (after skipping over-long ones), in
    /// corpus order.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Skip prompts longer than this many tokens (chat-formatted).
    #[arg(long, default_value_t = 512)]
    pub max_prompt_tokens: usize,
    /// 0 = greedy answers.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Prompts decoded together (one pass per step for all their rows).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Rows per parquet part.
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Kernels of the base's generation: native (our CPU kernels: each answer the one
    /// eesd-infer's plain decoding gives, whatever the batch) or torch [default: native on
    /// cpu, torch on cuda].
    #[arg(long)]
    pub kernels: Option<String>,
}

impl GenArgs {
    /// Every count and rate the user can get wrong, before the model loads.
    pub fn validate(&self) -> Result<()> {
        if self.limit == Some(0) {
            anyhow::bail!("--limit 0 takes no prompt: give at least 1 (or leave it out for all)");
        }
        for (name, v) in [
            ("batch-size", self.batch_size),
            ("chunk", self.chunk),
            ("max-new-tokens", self.max_new_tokens),
            ("max-prompt-tokens", self.max_prompt_tokens),
        ] {
            if v == 0 {
                anyhow::bail!("--{name} must be at least 1");
            }
        }
        SamplingParams::new(self.temperature, 0, self.top_p)?;
        eesd_core::device::base_on_native(self.kernels.as_deref(), self.base.device.as_deref())?;
        Ok(())
    }
}

pub fn run(a: &GenArgs) -> Result<()> {
    a.validate()?;
    let sampling = SamplingParams::new(a.temperature, 0, a.top_p)?;
    let mut sources = Vec::new();
    let mut references: std::collections::HashMap<String, String> = Default::default();
    for spec in &a.data {
        sources.push(corpus::read_prompts(spec, &a.prompt_column)?);
        if let Some(col) = &a.reference_column {
            for r in corpus::read_prompts(spec, col)? {
                references.insert(r.id, r.prompt);
            }
        }
    }
    let p = a
        .base
        .load()
        .with_context(|| format!("loading {}", a.base.model))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    // Resume: ids already written are skipped; parts from another base are refused.
    let mut done: HashSet<String> = HashSet::new();
    let mut parts = 0usize;
    if let Ok(existing) = corpus::expand(&format!("{}/part-*.parquet", a.out.display())) {
        parts = existing.len();
        for row in corpus::read_teacher(a.out.to_str().unwrap_or_default())? {
            if row.base_fingerprint != p.fingerprint {
                bail!(
                    "{} holds teacher data of base {}, but this model is {}: use another --out",
                    a.out.display(),
                    row.base_fingerprint,
                    p.fingerprint
                );
            }
            done.insert(row.id);
        }
    }
    let mut todo = Vec::new();
    for prompts in sources {
        let mut taken = 0;
        for row in prompts {
            if a.limit.is_some_and(|l| taken >= l) {
                break;
            }
            let ids = p.tokenizer.encode_chat(&row.prompt)?;
            if ids.len() > a.max_prompt_tokens || ids.is_empty() {
                continue;
            }
            if a.reference_column.is_some()
                && references.get(&row.id).is_none_or(|r| r.trim().is_empty())
            {
                continue; // fixed-corpus mode: rows without a reference answer are skipped
            }
            todo.push((row, ids));
            taken += 1;
        }
    }
    todo.retain(|(r, _)| !done.contains(&r.id));
    eprintln!(
        "gen: {} prompts to answer ({} already done) with {}",
        todo.len(),
        done.len(),
        p.fingerprint
    );
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} prompts, {msg}, eta {eta}",
    )?);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    let native = match (
        &a.reference_column,
        eesd_core::device::base_on_native(a.kernels.as_deref(), a.base.device.as_deref())?,
    ) {
        (None, true) => Some(NativeModel::new(&p.model).context("the base on the native kernels")?),
        _ => None,
    };
    tch::manual_seed(a.seed);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    for chunk in todo.chunks(a.chunk.max(1)) {
        let mut rows = Vec::with_capacity(chunk.len());
        for batch in chunk.chunks(a.batch_size.max(1)) {
            let ids: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
            let outs = match (&a.reference_column, &native) {
                (None, Some(nm)) => generate_native(nm, &p.model, &ids, &opts)?,
                (None, None) => generate_batch(&p.model, &ids, &opts)?,
                (Some(_), _) => batch
                    .iter()
                    .map(|(row, _)| {
                        let mut r = p.tokenizer.encode(&references[&row.id], false)?;
                        r.truncate(a.max_new_tokens);
                        Ok(r)
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            for ((row, prompt_ids), response_ids) in batch.iter().zip(outs) {
                tokens += response_ids.len();
                rows.push(TeacherRow {
                    id: row.id.clone(),
                    prompt: row.prompt.clone(),
                    response: p.tokenizer.decode(&response_ids)?,
                    prompt_ids: prompt_ids.clone(),
                    response_ids,
                    base_fingerprint: p.fingerprint.clone(),
                });
            }
            bar.inc(batch.len() as u64);
            bar.set_message(format!(
                "{:.1} tok/s",
                tokens as f64 / t0.elapsed().as_secs_f64()
            ));
        }
        let path = a.out.join(format!("part-{parts:05}.parquet"));
        corpus::write_teacher(&path, &rows)?;
        parts += 1;
    }
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "gen: {} responses, {tokens} tokens in {secs:.1}s ({:.1} tok/s{}) -> {}",
        todo.len(),
        tokens as f64 / secs.max(1e-9),
        eesd_core::cuda_graph::peak_memory_note(p.model.device),
        a.out.display()
    );
    Ok(())
}
