//! `eesd-train distill`: train the early-exit head by self-distillation (EESD.md section 1).
//!
//! The base is frozen: its tensors are never given to the optimiser, layers `[0, N)` and the
//! teacher's forward pass run without autograd. Per example (prompt + an answer: the base's own,
//! or a fixed corpus's): one teacher-forced pass of the base gives the layer-N states and the
//! teacher's logits; the head runs on the layer-N states; the loss is forward KL from teacher to
//! head at temperature T (times T^2) plus a weighted cross-entropy on the teacher's argmax
//! (the token greedy verification accepts; for the base's own greedy answers it is the answer
//! itself), both on response positions only.

use crate::adamw::{clip_grad_norm, lr_at, AdamW};
use anyhow::{bail, Context, Result};
use clap::Args;
use eesd_core::args::ModelArgs;
use eesd_core::corpus::{self, TeacherRow};
use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec, LmHeadMode};
use eesd_core::model::Llama;
use eesd_core::native::NativeModel;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Args, Debug, Clone, Serialize)]
#[command(allow_negative_numbers = true)]
pub struct DistillArgs {
    /// The base model (`--model`, `--device`, `--dtype` [default: bf16]); the head always
    /// trains in f32.
    #[command(flatten)]
    pub base: ModelArgs,
    /// Teacher data (parquet parts from `gen`, or any data with the documented schema).
    #[arg(long, required = true)]
    pub data: Vec<String>,
    /// Held-out teacher data for evaluation [default: the last 5% of --data].
    #[arg(long)]
    pub eval_data: Vec<String>,
    /// Output folder: checkpoint/ (the head, loadable by eesd-infer), metrics.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// N: the head reads the hidden state after base layers [0, N).
    #[arg(long)]
    pub exit_layer: usize,
    /// E: decoder layers in the head.
    #[arg(long, default_value_t = 1)]
    pub head_layers: usize,
    #[arg(long, value_enum, default_value_t = HeadInit::LastLayer)]
    pub init: HeadInit,
    #[arg(long, value_enum, default_value_t = LmHeadMode::Shared)]
    pub lm_head: LmHeadMode,
    /// Predict only the V most frequent teacher tokens (0 = the whole vocabulary).
    #[arg(long, default_value_t = 0)]
    pub draft_vocab: usize,
    /// Let the head also read the base's final state (after the norm) of the previous
    /// position, which the verifier has for every committed token: a zero-initialised
    /// projection added to the head's input.
    #[arg(long)]
    pub final_state_input: bool,
    /// Optimiser steps.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Examples per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 8)]
    pub accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 20)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 1.0)]
    pub kl_weight: f64,
    #[arg(long, default_value_t = 0.1)]
    pub ce_weight: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub kd_temperature: f64,
    /// Evaluate (and checkpoint) every this many steps.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out examples per evaluation.
    #[arg(long, default_value_t = 48)]
    pub eval_examples: usize,
    /// Longest prompt + response used (longer are cut).
    #[arg(long, default_value_t = 512)]
    pub max_seq: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from `--out`/checkpoint (optimiser moments and data position restored).
    #[arg(long)]
    pub resume: bool,
    /// End the run after this step as if it had been killed there (after its checkpoint, when
    /// the step has one): for testing `--resume` and for splitting a run into sessions.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Also write the final head alone (no optimiser state, f16 weights) to this folder: the
    /// small artefact to ship, e.g. under data/heads/.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Only measure: evaluate the head in `--out`/checkpoint on the held-out data, print the
    /// metrics as JSON and train nothing (with `--export`, also write the head with them).
    #[arg(long)]
    pub eval_only: bool,
    /// Kernels of the frozen base's passes (teacher states and logits): native (our CPU
    /// kernels, the ones eesd-infer decodes with) or torch [default: native on cpu, torch on
    /// cuda]. The head itself always trains through torch (autograd).
    #[arg(long)]
    pub kernels: Option<String>,
    /// Replace a head already at `--export`, and start over in an `--out` that holds a run
    /// (without it both are refused before any work).
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
}

impl DistillArgs {
    /// Every flag the user can get wrong, checked before the model loads; each message names
    /// the flag to change.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bail!("--{name} must be a finite number > 0, got {v}")
            }
        };
        let non_negative = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bail!("--{name} must be a finite number >= 0, got {v}")
            }
        };
        positive("lr", self.lr)?;
        positive("clip", self.clip)?;
        positive("kd-temperature", self.kd_temperature)?;
        non_negative("weight-decay", self.weight_decay)?;
        non_negative("kl-weight", self.kl_weight)?;
        non_negative("ce-weight", self.ce_weight)?;
        if self.kl_weight == 0.0 && self.ce_weight == 0.0 {
            bail!("--kl-weight and --ce-weight are both 0: the loss would be 0");
        }
        for (name, v) in [
            ("steps", self.steps as usize),
            ("accum", self.accum),
            ("eval-every", self.eval_every as usize),
            ("eval-examples", self.eval_examples),
            ("head-layers", self.head_layers),
        ] {
            if v == 0 && !(self.eval_only && name == "steps") {
                bail!("--{name} must be at least 1");
            }
        }
        eesd_core::device::base_on_native(self.kernels.as_deref(), self.base.device.as_deref())?;
        if self.max_seq < 2 {
            bail!(
                "--max-seq {} leaves no room for a prompt and a response token",
                self.max_seq
            );
        }
        Ok(())
    }

    /// Refuses to replace what the user did not ask to replace: a head at `--export` (and
    /// anything else there, ever), a run in `--out` (without `--resume`).
    pub fn check_outputs(&self) -> Result<()> {
        if let Some(dir) = &self.export {
            if dir.exists() {
                let names: Vec<String> = std::fs::read_dir(dir)
                    .with_context(|| format!("reading --export {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect();
                let foreign: Vec<&String> = names
                    .iter()
                    .filter(|n| !matches!(n.as_str(), "head.json" | "head.safetensors"))
                    .collect();
                if !foreign.is_empty() {
                    bail!(
                        "--export {} holds other files ({}): exporting replaces the whole folder; \
                         give a folder of its own",
                        dir.display(),
                        foreign
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if !names.is_empty() && !self.force {
                    bail!(
                        "--export {} already holds a head: give --force to replace it",
                        dir.display()
                    );
                }
            }
        }
        let state = checkpoint_dir(&self.out).join("trainer.json");
        if !self.eval_only && !self.resume && !self.force && state.exists() {
            bail!(
                "--out {} holds a run ({}): give --resume to continue it or --force to start over",
                self.out.display(),
                state.display()
            );
        }
        Ok(())
    }
}

/// Trainer state saved next to the head, so a resumed run continues the same run.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
struct TrainerState {
    step: u64,
    adam_t: u64,
    best_agreement: f64,
}

/// One training or evaluation example on the device.
struct Example {
    ids: Tensor,
    /// Index of the first position whose next token is a response token.
    start: i64,
    /// Response tokens predicted at positions start.. (i64, on the device).
    targets: Tensor,
}

/// Whether `row` gives at least one response token within `max_seq` (see [`example`]).
fn example_fits(row: &TeacherRow, max_seq: usize) -> bool {
    let p = row.prompt_ids.len();
    p > 0 && !row.response_ids.is_empty() && max_seq > p
}

fn example(row: &TeacherRow, max_seq: usize, device: tch::Device) -> Option<Example> {
    let mut seq: Vec<i64> = row
        .prompt_ids
        .iter()
        .chain(&row.response_ids)
        .map(|&t| t as i64)
        .collect();
    seq.truncate(max_seq);
    let p = row.prompt_ids.len();
    if row.response_ids.is_empty() || p == 0 || seq.len() <= p {
        return None;
    }
    let targets = Tensor::from_slice(&seq[p..]).to_device(device);
    Some(Example {
        ids: Tensor::from_slice(&seq).to_device(device).unsqueeze(0),
        start: p as i64 - 1,
        targets,
    })
}

/// The base's side of an example, without autograd.
struct Teacher {
    /// Layer-N states `[1, T, H]`.
    h: Tensor,
    /// Final states after the norm of the previous positions `[1, T, H]` (zeros first).
    prev_final: Tensor,
    /// Logits at the response positions `[R, V]` (f32).
    logits: Tensor,
}

/// The frozen base's passes: torch, or the native CPU kernels (bf16 products about 4x
/// faster than torch's on CPUs without AVX512-BF16, and the very states and logits the
/// decoder computes at inference).
enum Frozen {
    Torch,
    Native(Box<NativeModel>),
}

impl Frozen {
    fn new(a: &DistillArgs, base: &Llama) -> Result<Self> {
        let native =
            eesd_core::device::base_on_native(a.kernels.as_deref(), a.base.device.as_deref())?;
        Ok(if native {
            Frozen::Native(Box::new(
                NativeModel::new(base).context("the base on the native kernels")?,
            ))
        } else {
            Frozen::Torch
        })
    }
}

/// Rows per native pass over a teacher example (memory stays flat in its length; the bits do
/// not depend on the chunking).
const NATIVE_CHUNK: usize = 128;

fn teacher(frozen: &Frozen, base: &Llama, n: usize, ex: &Example) -> Result<Teacher> {
    match frozen {
        Frozen::Torch => Ok(teacher_torch(base, n, ex)),
        Frozen::Native(nm) => teacher_native(nm, base, n, ex, NATIVE_CHUNK),
    }
}

/// [`teacher_torch`] on the native kernels: the example in chunks through layers [0, N)
/// (the head's input) and [N, L), the final norm, and the LM head at the response rows only.
fn teacher_native(
    nm: &NativeModel,
    base: &Llama,
    n: usize,
    ex: &Example,
    chunk: usize,
) -> Result<Teacher> {
    let _g = tch::no_grad_guard();
    let ids: Vec<u32> = Vec::<i64>::try_from(ex.ids.squeeze_dim(0))?
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let (t, h, layers) = (ids.len(), nm.hidden(), base.num_layers());
    let mut cache = base.new_cache(1, t as i64);
    let (mut lower, mut top) = (Vec::with_capacity(t * h), Vec::with_capacity(t * h));
    for piece in ids.chunks(chunk) {
        let rows = piece.len();
        let mut x = nm.embed(piece);
        nm.forward_layers(&mut x, rows, 0..n, &mut cache)?;
        lower.extend_from_slice(&x);
        nm.forward_layers(&mut x, rows, n..layers, &mut cache)?;
        top.extend_from_slice(&x);
    }
    let kind = base.embed_tokens.kind();
    let states = |v: &[f32]| Tensor::from_slice(v).view([1, t as i64, h as i64]);
    let finals = states(&nm.final_norm(&top)).to_kind(kind);
    let (start, r) = (ex.start as usize, ex.targets.size()[0] as usize);
    let logits = nm.logits(&top[start * h..(start + r) * h], r);
    Ok(Teacher {
        prev_final: eesd_core::head::previous_positions(&finals),
        h: states(&lower).to_kind(kind),
        logits,
    })
}

fn teacher_torch(base: &Llama, n: usize, ex: &Example) -> Teacher {
    let _g = tch::no_grad_guard();
    let t = ex.ids.size()[1];
    let mut cache = base.new_cache(1, t);
    let h = base.forward_layers(&base.embed(&ex.ids), 0..n, &mut cache);
    let top = base.forward_layers(&h, n..base.num_layers(), &mut cache);
    let finals = base.final_norm(&top);
    let r = ex.targets.size()[0];
    let logits = base.logits(&finals.narrow(1, ex.start, r)).squeeze_dim(0);
    Teacher {
        prev_final: eesd_core::head::previous_positions(&finals),
        h,
        logits,
    }
}

/// Head logits at the response positions `[R, V_d]`, with autograd.
fn student(base: &Llama, head: &EarlyExitHead, t: &Teacher, ex: &Example) -> Tensor {
    let len = t.h.size()[1];
    let mut cache = head.new_cache(base, 1, len);
    let kind = head_kind(head);
    let prev = t.prev_final.to_kind(kind);
    let hidden = head.forward_hidden(base, &t.h.to_kind(kind), Some(&prev), &mut cache);
    let r = ex.targets.size()[0];
    head.logits(&hidden.narrow(1, ex.start, r)).squeeze_dim(0)
}

fn head_kind(head: &EarlyExitHead) -> Kind {
    head.norm.weight.kind()
}

/// Teacher logits restricted to the draft vocabulary (when reduced) and the targets mapped to
/// draft indices (-100 where a target is outside it).
fn to_draft_space(
    teacher: &Tensor,
    targets: &Tensor,
    map: &Option<(Tensor, Tensor)>,
) -> (Tensor, Tensor) {
    match map {
        None => (teacher.shallow_clone(), targets.shallow_clone()),
        Some((ids, inverse)) => (
            teacher.index_select(1, ids),
            inverse.index_select(0, targets),
        ),
    }
}

struct Losses {
    total: Tensor,
    kl: f64,
    ce: f64,
}

fn loss(a: &DistillArgs, student: &Tensor, teacher: &Tensor, targets: &Tensor) -> Losses {
    let t = a.kd_temperature;
    let p = (teacher / t).softmax(-1, Kind::Float);
    let log_p = (teacher / t).log_softmax(-1, Kind::Float);
    let log_q = (student / t).log_softmax(-1, Kind::Float);
    // Forward KL(p || q) = sum p (log p - log q), averaged over positions, scaled by T^2.
    let kl = (&p * (log_p - &log_q))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
        * (t * t);
    let valid = targets.ge(0);
    let ce = if bool::try_from(valid.any()).unwrap_or(false) {
        student.log_softmax(-1, Kind::Float).nll_loss_nd::<Tensor>(
            &targets.where_scalarother(&valid, -100),
            None,
            tch::Reduction::Mean,
            -100,
        )
    } else {
        Tensor::zeros([], (Kind::Float, student.device()))
    };
    let total = &kl * a.kl_weight + &ce * a.ce_weight;
    Losses {
        kl: kl.double_value(&[]),
        ce: ce.double_value(&[]),
        total,
    }
}

/// Held-out metrics of the head against the base, per source and overall.
fn evaluate(
    frozen: &Frozen,
    base: &Llama,
    head: &EarlyExitHead,
    n: usize,
    rows: &[TeacherRow],
    a: &DistillArgs,
) -> Result<serde_json::Value> {
    let _g = tch::no_grad_guard();
    let device = base.device;
    let vocab = base.cfg.vocab_size as i64;
    #[derive(Default)]
    struct Acc {
        positions: f64,
        agree: f64,
        min_pq: f64,
        /// sum over start positions of min(run of agreements from there, K) for K = 1..8
        run_sums: [f64; 8],
        /// positions where the base's token is among the head's k most likely, k = 1..8:
        /// what a round offering k candidates for the first draft could accept
        topk: [f64; 8],
    }
    let mut per: HashMap<String, Acc> = HashMap::new();
    for row in rows {
        let Some(ex) = example(row, a.max_seq, device) else {
            continue;
        };
        let tch = teacher(frozen, base, n, &ex)?;
        let s_logits = student(base, head, &tch, &ex).to_kind(Kind::Float);
        let t_logits = tch.logits;
        let q = head.to_full_vocab(&s_logits.softmax(-1, Kind::Float), vocab);
        let p = t_logits.softmax(-1, Kind::Float);
        let t_arg = t_logits.argmax(-1, false);
        let agree = head
            .token_ids(&s_logits.argmax(-1, false))
            .eq_tensor(&t_arg);
        let agree: Vec<bool> =
            Vec::<bool>::try_from(agree.to_device(tch::Device::Cpu)).unwrap_or_default();
        let k = 8.min(s_logits.size()[1]);
        let (_, top8) = s_logits.topk(k, -1, true, true);
        let hit = head
            .token_ids(&top8.flatten(0, -1))
            .view([-1, k])
            .eq_tensor(&t_arg.unsqueeze(-1))
            .cumsum(-1, Kind::Int64)
            .clamp_max(1)
            .sum_dim_intlist(0, false, Kind::Int64);
        let hit = Vec::<i64>::try_from(hit.to_device(tch::Device::Cpu)).unwrap_or_default();
        let min_pq = p.minimum(&q).sum(Kind::Double).double_value(&[]);
        let source = row.id.split('/').next().unwrap_or("all").to_string();
        for key in [source, "all".to_string()] {
            let acc = per.entry(key).or_default();
            acc.positions += agree.len() as f64;
            acc.agree += agree.iter().filter(|&&x| x).count() as f64;
            acc.min_pq += min_pq;
            for (t, h) in acc.topk.iter_mut().zip(&hit) {
                *t += *h as f64;
            }
            // Run length of agreements starting at each position: what a round drafting from
            // there would get accepted (teacher-forced estimate).
            let mut run = vec![0usize; agree.len() + 1];
            for i in (0..agree.len()).rev() {
                run[i] = if agree[i] { run[i + 1] + 1 } else { 0 };
            }
            for (k, s) in acc.run_sums.iter_mut().enumerate() {
                *s += run[..agree.len()]
                    .iter()
                    .map(|&r| r.min(k + 1) as f64)
                    .sum::<f64>();
            }
        }
    }
    let mut out = serde_json::Map::new();
    for (key, acc) in per {
        let pos = acc.positions.max(1.0);
        let tokens: Vec<f64> = acc.run_sums.iter().map(|s| 1.0 + s / pos).collect();
        out.insert(
            key,
            serde_json::json!({
                "positions": acc.positions,
                "top1_agreement": acc.agree / pos,
                "expected_acceptance": acc.min_pq / pos,
                "expected_tokens_per_round_k1_to_8": tokens,
                "topk_agreement_k1_to_8": acc.topk.iter().map(|t| t / pos).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// Token ids by descending frequency in the teacher responses; EOS ids always included.
fn draft_vocabulary(rows: &[TeacherRow], size: usize, vocab: usize, eos: &[u32]) -> Vec<u32> {
    let mut counts = vec![0u64; vocab];
    for r in rows {
        for &t in r.prompt_ids.iter().chain(&r.response_ids) {
            if (t as usize) < vocab {
                counts[t as usize] += 1;
            }
        }
    }
    for &e in eos {
        if (e as usize) < vocab {
            counts[e as usize] = u64::MAX;
        }
    }
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by_key(|&t| (std::cmp::Reverse(counts[t as usize]), t));
    order.truncate(size.min(vocab));
    order
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Writes head, optimiser moments and trainer state into one folder, atomically.
fn save_checkpoint(
    out: &Path,
    head: &EarlyExitHead,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let dir = checkpoint_dir(out);
    head.save(&dir)?; // atomic rename of the whole folder
                      // The optimiser state goes into the same folder after the head landed; a crash between the
                      // two leaves a head without moments, which `--resume` refuses rather than misusing.
    let moments: Vec<(String, Tensor)> = opt
        .m
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("m.{i}"), m.to_device(tch::Device::Cpu)))
        .chain(
            opt.v
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("v.{i}"), v.to_device(tch::Device::Cpu))),
        )
        .collect();
    let tmp = dir.join(".optimizer.safetensors.tmp");
    Tensor::write_safetensors(&moments, &tmp)?;
    std::fs::rename(&tmp, dir.join("optimizer.safetensors"))?;
    let tmp = dir.join(".trainer.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join("trainer.json"))?;
    Ok(())
}

pub fn run(a: &DistillArgs) -> Result<serde_json::Value> {
    a.validate()?;
    a.check_outputs()?;
    let p = a
        .base
        .load()
        .with_context(|| format!("loading {}", a.base.model))?;
    let device = p.model.device;
    let base = &p.model;
    let frozen = Frozen::new(a, base)?;
    let l = base.num_layers();
    if a.exit_layer == 0 || a.exit_layer >= l {
        bail!(
            "--exit-layer {} is outside [1, {}] for this {l}-layer model",
            a.exit_layer,
            l - 1
        );
    }
    let mut rows = Vec::new();
    for spec in &a.data {
        rows.extend(corpus::read_teacher(spec)?);
    }
    if rows.is_empty() {
        bail!("the teacher data {:?} holds no rows", a.data);
    }
    if !rows.iter().any(|r| example_fits(r, a.max_seq)) {
        let shortest = rows.iter().map(|r| r.prompt_ids.len()).min().unwrap_or(0);
        bail!(
            "--max-seq {} leaves no response token in any teacher row (the shortest prompt has {shortest} tokens)",
            a.max_seq
        );
    }
    let mut eval_rows = Vec::new();
    for spec in &a.eval_data {
        eval_rows.extend(corpus::read_teacher(spec)?);
    }
    for r in rows.iter().chain(&eval_rows) {
        if r.base_fingerprint != p.fingerprint {
            bail!(
                "teacher row {} was made by base {}, but this model is {}: regenerate it with `eesd-train gen`",
                r.id,
                r.base_fingerprint,
                p.fingerprint
            );
        }
    }
    if eval_rows.is_empty() {
        let cut = rows.len() - (rows.len() / 20).max(1).min(rows.len() - 1);
        eval_rows = rows.split_off(cut);
    }
    // Interleave sources so a small evaluation still covers each of them.
    let mut by_source: Vec<Vec<TeacherRow>> = Vec::new();
    for r in eval_rows {
        let src = r.id.split('/').next().unwrap_or("").to_string();
        match by_source
            .iter_mut()
            .find(|g| g[0].id.split('/').next() == Some(src.as_str()))
        {
            Some(g) => g.push(r),
            None => by_source.push(vec![r]),
        }
    }
    let mut eval_rows = Vec::new();
    for i in 0.. {
        let before = eval_rows.len();
        for g in &by_source {
            if let Some(r) = g.get(i) {
                eval_rows.push(r.clone());
            }
        }
        if eval_rows.len() == before || eval_rows.len() >= a.eval_examples {
            break;
        }
    }
    eval_rows.truncate(a.eval_examples);

    let ckpt = checkpoint_dir(&a.out);
    if a.eval_only {
        let mut head = EarlyExitHead::load_as(&ckpt, base, &p.fingerprint, Kind::Float)
            .with_context(|| format!("--eval-only needs a checkpoint in {}", ckpt.display()))?;
        head.cast_lm_head(Kind::Float); // as in training
        let e = evaluate(&frozen, base, &head, head.spec.exit_layer, &eval_rows, a)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string_pretty(&e)?)?;
        out.flush()?;
        if let Some(dir) = &a.export {
            // A head trained elsewhere (scripts/head_levers.py) ships with the metrics this
            // evaluation writes, as a trained one does: the decoder's Thompson prior reads them.
            head.spec.metrics = e["all"].clone();
            head.spec.metrics["per_source"] = e.clone();
            head.cast_to(Kind::Half);
            head.save(dir)?;
            eprintln!("distill: exported the evaluated head to {}", dir.display());
        }
        return Ok(e);
    }
    std::fs::create_dir_all(&a.out)?;
    let (mut head, mut state) = if a.resume && ckpt.join("trainer.json").exists() {
        let head = EarlyExitHead::load_as(&ckpt, base, &p.fingerprint, Kind::Float)
            .with_context(|| format!("resuming from {}", ckpt.display()))?;
        let state: TrainerState =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer.json"))?)?;
        (head, state)
    } else {
        tch::manual_seed(a.seed as i64);
        let mut spec = HeadSpec::for_base(base, &p.fingerprint, a.exit_layer);
        spec.head_layers = a.head_layers;
        spec.final_state_input = a.final_state_input;
        spec.init = a.init;
        spec.lm_head = a.lm_head;
        let vocab = (a.draft_vocab > 0).then(|| {
            draft_vocabulary(
                &rows,
                a.draft_vocab,
                base.cfg.vocab_size,
                &p.tokenizer.eos_ids,
            )
        });
        let head = EarlyExitHead::init(base, spec, vocab.as_deref())?;
        (head, TrainerState::default())
    };
    head.spec.training = serde_json::to_value(a)?;
    // The head trains in f32 whatever the base dtype.
    for t in head.trainable_mut() {
        *t = t.detach().to_kind(Kind::Float).set_requires_grad(true);
    }
    head.cast_lm_head(Kind::Float);
    let mut opt = {
        let params = head.trainable_mut();
        AdamW::new(&params, a.lr, a.weight_decay)
    };
    if a.resume && ckpt.join("trainer.json").exists() {
        let named = Tensor::read_safetensors(ckpt.join("optimizer.safetensors"))
            .context("the checkpoint has no optimizer.safetensors: cannot resume the same run")?;
        let map: HashMap<String, Tensor> = named.into_iter().collect();
        for i in 0..opt.m.len() {
            opt.m[i] = map
                .get(&format!("m.{i}"))
                .context("optimizer moments missing")?
                .to_device(device);
            opt.v[i] = map
                .get(&format!("v.{i}"))
                .context("optimizer moments missing")?
                .to_device(device);
        }
        opt.t = state.adam_t;
        eprintln!("distill: resuming at step {}", state.step);
    }
    let draft_map = head.vocab_map.as_ref().map(|ids| {
        let inverse = Tensor::full([base.cfg.vocab_size as i64], -100, (Kind::Int64, device));
        let pos = Tensor::arange(ids.size()[0], (Kind::Int64, device));
        (
            ids.shallow_clone(),
            inverse.index_put(&[Some(ids.shallow_clone())], &pos, false),
        )
    });

    // Data order: a seeded permutation per epoch, so position `step * accum` fixes the data.
    let order = |epoch: u64| {
        let mut idx: Vec<usize> = (0..rows.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            a.seed ^ (epoch.wrapping_mul(0x9E37_79B9)),
        ));
        idx
    };
    let metrics_path = a.out.join("metrics.jsonl");
    if state.step > 0 {
        // Steps logged after the checkpoint we resume from (a killed run) are redone: drop them.
        let kept: Vec<String> = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= state.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&metrics_path, kept.concat())?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    let bar = ProgressBar::new(a.steps);
    bar.set_position(state.step);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} step {pos}/{len} {msg} eta {eta}",
    )?);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut last_eval = serde_json::Value::Null;
    while state.step < a.steps {
        let lr = lr_at(state.step, a.lr, a.warmup, a.steps);
        let (mut kl_sum, mut ce_sum, mut n) = (0.0, 0.0, 0usize);
        for j in 0..a.accum {
            let pos = state.step as usize * a.accum + j;
            let epoch = (pos / rows.len()) as u64;
            let row = &rows[order(epoch)[pos % rows.len()]];
            let Some(ex) = example(row, a.max_seq, device) else {
                continue;
            };
            let tch = teacher(&frozen, base, a.exit_layer, &ex)?;
            let s_logits = student(base, &head, &tch, &ex);
            let t_logits = tch.logits;
            let greedy = t_logits.argmax(-1, false);
            let (t_logits, targets) = to_draft_space(&t_logits, &greedy, &draft_map);
            let l = loss(a, &s_logits.to_kind(Kind::Float), &t_logits, &targets);
            if !(l.kl.is_finite() && l.ce.is_finite()) {
                bar.abandon();
                bail!(
                    "loss became {} at step {} (example {}); stopped. The last good checkpoint stays in {}",
                    if l.kl.is_nan() || l.ce.is_nan() { "NaN" } else { "infinite" },
                    state.step,
                    row.id,
                    ckpt.display()
                );
            }
            (l.total / a.accum as f64).backward();
            kl_sum += l.kl;
            ce_sum += l.ce;
            n += 1;
            tokens += ex.targets.size()[0] as usize;
        }
        let mut params = head.trainable_mut();
        let grad_norm = clip_grad_norm(&params, a.clip);
        opt.step(&mut params, lr);
        state.step += 1;
        state.adam_t = opt.t;
        let n = n.max(1) as f64;
        let mut record = serde_json::json!({
            "step": state.step, "lr": lr, "kl": kl_sum / n, "ce": ce_sum / n, "grad_norm": grad_norm,
            "tokens_per_s": tokens as f64 / t0.elapsed().as_secs_f64(),
        });
        bar.set_message(format!("kl {:.3} ce {:.3}", kl_sum / n, ce_sum / n));
        bar.set_position(state.step);
        if state.step % a.eval_every == 0 || state.step == a.steps {
            let e = evaluate(&frozen, base, &head, a.exit_layer, &eval_rows, a)?;
            let agree = e["all"]["top1_agreement"].as_f64().unwrap_or(0.0);
            state.best_agreement = state.best_agreement.max(agree);
            record["eval"] = e.clone();
            head.spec.step = state.step;
            head.spec.metrics = e["all"].clone();
            head.spec.metrics["per_source"] = e.clone();
            save_checkpoint(&a.out, &head, &opt, &state)?;
            bar.println(format!(
                "step {}: held-out top-1 agreement {:.3}",
                state.step, agree
            ));
            last_eval = e;
        }
        writeln!(metrics, "{record}")?;
        if a.stop_after == Some(state.step) {
            bar.abandon();
            eprintln!("distill: stopped after step {} (--stop-after)", state.step);
            return Ok(last_eval);
        }
    }
    bar.finish();
    if let Some(dir) = &a.export {
        let mut slim = EarlyExitHead::load_as(&ckpt, base, &p.fingerprint, Kind::Float)?;
        slim.cast_to(Kind::Half);
        slim.save(dir)?;
        eprintln!("distill: exported the head to {}", dir.display());
    }
    eprintln!(
        "distill: {} steps, {tokens} response tokens in {:.1}s ({:.1} tok/s{}) -> {}",
        a.steps,
        t0.elapsed().as_secs_f64(),
        tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        eesd_core::cuda_graph::peak_memory_note(device),
        ckpt.display()
    );
    Ok(last_eval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use eesd_core::pretrained::Pretrained;

    /// The native frozen-base pass gives the torch pass's layer-N states, previous final
    /// states and response logits (to f32 rounding in f32, to bf16's in bf16), whole or in
    /// chunks of 16 rows.
    #[test]
    fn native_teacher_pass_matches_torch() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../eesd-core/tests/fixtures/mha_untied"
        );
        let row = TeacherRow {
            id: "t/0".into(),
            prompt: String::new(),
            response: String::new(),
            prompt_ids: (0..90).map(|i| 5 + (i * 7) % 100).collect(),
            response_ids: (0..37).map(|i| 5 + (i * 11) % 100).collect(),
            base_fingerprint: String::new(),
        };
        for (kind, tol) in [(Kind::Float, 1e-4), (Kind::BFloat16, 0.1)] {
            let p = Pretrained::load(dir, tch::Device::Cpu, kind).unwrap();
            let base = &p.model;
            let ex = example(&row, 512, tch::Device::Cpu).unwrap();
            let nm = NativeModel::new(base).unwrap();
            let a = teacher(&Frozen::Torch, base, 1, &ex).unwrap();
            for chunk in [NATIVE_CHUNK, 16] {
                let b = teacher_native(&nm, base, 1, &ex, chunk).unwrap();
                for (name, x, y) in [
                    ("layer-N states", &a.h, &b.h),
                    ("previous finals", &a.prev_final, &b.prev_final),
                    ("logits", &a.logits, &b.logits),
                ] {
                    assert_eq!(x.size(), y.size(), "{name}");
                    let (x, y) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
                    let err = (&x - &y).abs().max().double_value(&[]);
                    let scale = x.abs().max().double_value(&[]).max(1.0);
                    assert!(
                        err <= tol * scale,
                        "{kind:?} chunk {chunk} {name}: max error {err} (scale {scale})"
                    );
                }
            }
        }
    }
}
