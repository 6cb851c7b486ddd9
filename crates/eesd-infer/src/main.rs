//! `eesd-infer`: generate text with a LLaMA-family model, and benchmark decoding.
//!
//! Generated text goes to stdout; progress and statistics go to stderr, so
//! `eesd-infer generate ... > out.txt` keeps only the text.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eesd_core::device::{parse_device, parse_dtype};
use eesd_core::head::EarlyExitHead;
use eesd_core::pretrained::Pretrained;
use eesd_core::sampling::SamplingParams;
use eesd_infer::controller::{self, Controller, ThompsonConfig};
use eesd_infer::cost::CostTracker;
use eesd_infer::plain::{self, GenerateOptions};
use eesd_infer::prompts::{read_prompt_file, Prompt};
use eesd_infer::speculative::{self, Engine, Kernels, SpecOptions};
use eesd_infer::stats::DecodeStats;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "eesd-infer",
    version,
    about = "Early-exiting speculative decoding for LLaMA-family models on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation for each prompt (text on stdout, statistics on stderr).
    Generate(GenerateArgs),
    /// Measure plain greedy decode tokens/s and this machine's memory-bandwidth floor.
    BenchDecode(BenchArgs),
    /// Run every controller on the same prompts (greedy) and compare them with plain decoding.
    Bench(SpecBenchArgs),
    /// Time a published model shape with random weights: plain decode vs the bandwidth floor,
    /// draft step cost c per exit layer, verify cost per width (for GPUs without checkpoints).
    BenchShape(ShapeArgs),
    /// CPU kernel timings on random weights: the streaming-read memory floor, and one pass of
    /// every weight product for 1..16 rows, native kernels vs torch, per dtype.
    BenchKernels(KernelArgs),
}

#[derive(Args)]
struct KernelArgs {
    /// smollm2-135m, llama2-7b, ... (random weights of that shape).
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// Comma-separated dtypes.
    #[arg(long, default_value = "bf16,f16,f32")]
    dtypes: String,
    /// Comma-separated row counts.
    #[arg(long, default_value = "1,2,3,5,9,16")]
    rows: String,
    /// Cached positions before the whole decode pass (attention reads them all).
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Passes per contender and row count, taken in interleaved rounds of 3.
    #[arg(long, default_value_t = 15)]
    reps: usize,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct ShapeArgs {
    /// llama2-7b, llama2-13b, llama2-70b or smollm2-135m.
    #[arg(long, default_value = "llama2-7b")]
    shape: String,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    dtype: Option<String>,
    /// Exit layers N to time, comma-separated.
    #[arg(long, default_value = "4,8,12")]
    exit_layers: String,
    /// Draft vocabulary size (0 = full).
    #[arg(long, default_value_t = 0)]
    draft_vocab: usize,
    #[arg(long, default_value_t = 8)]
    max_draft: usize,
    /// Prompt tokens in the cache while timing.
    #[arg(long, default_value_t = 256)]
    context: i64,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct SpecBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The trained early-exit head folder.
    #[arg(long)]
    head: PathBuf,
    /// Prompt corpora (parquet with `id` and `prompt`); one dataset per flag.
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Prompts per dataset (the first ones that fit --max-prompt-tokens).
    #[arg(long, default_value_t = 8)]
    num_prompts: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 320)]
    max_prompt_tokens: usize,
    /// Comma-separated controllers; `off` is added when missing (speedups are against it).
    #[arg(
        long,
        default_value = "off,thompson,thompson-calibrated,heuristic,confidence:0.5,fixed:1,fixed:2,fixed:3,fixed:4,fixed:6"
    )]
    controllers: String,
    #[arg(long, default_value_t = 8)]
    max_draft: usize,
    /// Folder for bench.json and bench.md.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Sampling temperature (0 = greedy); with --top-p, one sampled row per controller is
    /// added to the greedy ones (its outputs are not compared: only greedy must be identical).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Exit with an error when any greedy output differs from plain decoding (`off`).
    #[arg(long)]
    require_identical: bool,
}

/// Which model, where, in what precision (the flags eesd-train shares), and which kernels.
#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    base: eesd_core::args::ModelArgs,
    /// Decode kernels: native (our CPU kernels: exact verification, fastest on CPU) or torch
    /// [default: native on cpu, torch on cuda]
    #[arg(long)]
    kernels: Option<String>,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    /// JSONL with `id` and `prompt` per line (plain text lines are prompts as they are).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap each prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// One JSON object per prompt on stdout (id, text, prompt_ids, ids, stats) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

/// Speculative decoding: the head and the draft-length controller.
#[derive(Args, Clone)]
struct SpecArgs {
    /// A trained early-exit head folder (head.json + head.safetensors). Without it decoding is plain.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Draft-length controller: thompson, thompson-calibrated, fixed:K, heuristic, confidence:P,
    /// off [default: thompson with --head, else off]
    #[arg(long)]
    controller: Option<String>,
    /// Most draft tokens per round.
    #[arg(long, default_value_t = 8)]
    max_draft: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts (JSONL with `id` and `prompt`), each run through the chat template.
    #[arg(long)]
    prompt_file: PathBuf,
    #[arg(long, default_value_t = 8)]
    num_prompts: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Write the measurements here as JSON.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn load(args: &ModelArgs) -> Result<Pretrained> {
    let p = args
        .base
        .load()
        .with_context(|| format!("loading model {}", args.base.model))?;
    let (device, kind) = (p.model.device, p.model.kind);
    if !p.unused_tensors.is_empty() {
        eprintln!(
            "note: {} checkpoint tensors unused: {:?}",
            p.unused_tensors.len(),
            p.unused_tensors
        );
    }
    eprintln!(
        "model {} ({} layers, hidden {}, vocab {}) on {:?} in {:?}",
        p.dir.display(),
        p.model.cfg.num_layers,
        p.model.cfg.hidden_size,
        p.model.cfg.vocab_size,
        device,
        kind
    );
    Ok(p)
}

/// The most drafts a round may propose: verifying more than 17 positions leaves the range where
/// a verification costs about one plain step (our kernels stream the weights once for up to 16
/// rows; beyond, cost grows with every row), so longer drafts cannot pay.
const MAX_DRAFT_LIMIT: usize = 16;

/// Refuses a `--max-draft` that cannot pay, and bounds it by what the generation can use.
fn draft_limit(max_draft: usize, max_new_tokens: usize) -> Result<usize> {
    if max_draft == 0 || max_draft > MAX_DRAFT_LIMIT {
        bail!(
            "--max-draft {max_draft}: a round drafts at least 1 and at most {MAX_DRAFT_LIMIT} \
             tokens (verifying more than {} positions costs more with every extra row and \
             cannot pay)",
            MAX_DRAFT_LIMIT + 1
        );
    }
    // Never more drafts than tokens left to generate after the first one.
    Ok(max_draft.min(max_new_tokens.saturating_sub(1)).max(1))
}

/// The decode engine for `args`' kernel choice.
fn engine<'a>(
    p: &'a Pretrained,
    head: Option<&'a EarlyExitHead>,
    args: &ModelArgs,
    max_draft: usize,
) -> Result<Engine<'a>> {
    let kernels = Kernels::parse(args.kernels.as_deref(), p.model.device)?;
    Ok(Engine::with_kernels(&p.model, head, kernels)?.with_verify_width(max_draft + 1))
}

fn encode(p: &Pretrained, text: &str, chat: bool) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(if chat {
        p.tokenizer.encode_chat(text)?
    } else {
        p.tokenizer.encode(text, true)?
    })
}

fn load_head(p: &Pretrained, dir: &Option<PathBuf>) -> Result<Option<EarlyExitHead>> {
    let Some(dir) = dir else { return Ok(None) };
    let head = EarlyExitHead::load(dir, &p.model, &p.fingerprint)
        .with_context(|| format!("loading head {}", dir.display()))?;
    eprintln!(
        "head {} (exit layer N = {}, {} layer(s), draft vocabulary {})",
        dir.display(),
        head.spec.exit_layer,
        head.spec.head_layers,
        head.draft_vocab_size()
    );
    Ok(Some(head))
}

/// The Beta prior: warm-started from the head's held-out acceptance when its training
/// recorded one (worth 4 observations), else uniform.
fn thompson_config(head: Option<&EarlyExitHead>, k_max: usize, seed: u64) -> ThompsonConfig {
    let mut cfg = ThompsonConfig {
        k_max,
        seed,
        ..Default::default()
    };
    if let Some(alpha) = head.and_then(|h| h.spec.metrics.get("top1_agreement")?.as_f64()) {
        cfg.prior = (1.0 + 4.0 * alpha, 1.0 + 4.0 * (1.0 - alpha));
    }
    cfg
}

fn make_controller(
    name: &str,
    head: Option<&EarlyExitHead>,
    k_max: usize,
    seed: u64,
) -> Result<Box<dyn Controller>> {
    if head.is_none() && name != "off" {
        bail!("controller `{name}` drafts with an early-exit head: give --head DIR (or use --controller off)");
    }
    Ok(controller::parse(
        name,
        &thompson_config(head, k_max, seed),
    )?)
}

fn spec_options(p: &Pretrained, gen: GenerateOptions) -> SpecOptions {
    SpecOptions {
        gen,
        // On CPU timing is free; on a GPU each timed round costs two synchronisations.
        time_every: if p.model.device.is_cuda() { 8 } else { 1 },
        check_invariants: cfg!(debug_assertions),
    }
}

fn print_summary(name: &str, s: &DecodeStats) {
    eprintln!(
        "{name}: prompt {} tok, {} new tok, decode {:.2} tok/s | rounds {}, drafted {}, accepted {}, acceptance {:.1}%, mean accepted length {:.2}, mean draft length {:.2}",
        s.prompt_tokens,
        s.new_tokens,
        s.decode_tokens_per_s(),
        s.rounds,
        s.drafted,
        s.accepted,
        100.0 * s.acceptance_rate(),
        s.mean_accepted_length(),
        s.mean_draft_length()
    );
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams::new(a.temperature, a.top_k, a.top_p)?;
    let prompts = match (&a.prompt, &a.prompt_file) {
        (Some(text), _) => vec![Prompt {
            id: "0".into(),
            text: text.clone(),
        }],
        (None, Some(f)) => read_prompt_file(f)?,
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let default_controller = if a.spec.head.is_some() {
        "thompson"
    } else {
        "off"
    };
    let controller_name = a
        .spec
        .controller
        .clone()
        .unwrap_or_else(|| default_controller.into());
    let max_draft = draft_limit(a.spec.max_draft, a.max_new_tokens)?;
    // Refuse a bad controller before the (slow) model load.
    controller::parse(
        &controller_name,
        &ThompsonConfig {
            k_max: max_draft,
            ..Default::default()
        },
    )?;
    let p = load(&a.model)?;
    let head = load_head(&p, &a.spec.head)?;
    let mut ctrl = make_controller(&controller_name, head.as_ref(), max_draft, a.seed as u64)?;
    let engine = engine(&p, head.as_ref(), &a.model, max_draft)?;
    let mut costs = if head.is_some() {
        CostTracker::calibrate(&engine, max_draft, 64, 3)
    } else {
        CostTracker::new(max_draft)
    };
    let opts = spec_options(
        &p,
        GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling,
            eos_ids: p.tokenizer.eos_ids.clone(),
        },
    );
    tch::manual_seed(a.seed);
    let stdout = std::io::stdout();
    let mut total = DecodeStats::default();
    for prompt in &prompts {
        let prompt_ids =
            encode(&p, &prompt.text, a.chat).with_context(|| format!("prompt {}", prompt.id))?;
        let mut printed = String::new();
        let stream = !a.json;
        let g = speculative::generate(
            &engine,
            &prompt_ids,
            &opts,
            ctrl.as_mut(),
            &mut costs,
            |ids| {
                if stream {
                    // Print the new suffix of the decoded text; hold back an incomplete UTF-8 tail.
                    if let Ok(text) = p.tokenizer.decode(ids) {
                        if text.len() > printed.len()
                            && text.starts_with(&printed)
                            && !text.ends_with('\u{FFFD}')
                        {
                            let mut out = stdout.lock();
                            let _ = out.write_all(&text.as_bytes()[printed.len()..]);
                            let _ = out.flush();
                            printed = text;
                        }
                    }
                }
            },
        )
        .with_context(|| format!("prompt {}", prompt.id))?;
        let text = p.tokenizer.decode(&g.ids)?;
        let s = &g.stats;
        if a.json {
            let mut stats = s.to_json();
            stats["stop_reason"] = serde_json::to_value(g.stop)?;
            stats["controller"] = controller_name.clone().into();
            let obj = serde_json::json!({
                "id": prompt.id, "text": text, "prompt_ids": prompt_ids, "ids": g.ids, "stats": stats,
            });
            println!("{obj}");
        } else {
            if text.len() > printed.len() && text.starts_with(&printed) {
                print!("{}", &text[printed.len()..]);
            }
            println!();
        }
        print_summary(
            &format!("[{}] {controller_name} ({:?})", prompt.id, g.stop),
            s,
        );
        total.merge(s);
    }
    if prompts.len() > 1 {
        print_summary(&format!("total {controller_name}"), &total);
    }
    Ok(())
}

fn bench_decode(a: BenchArgs) -> Result<()> {
    let p = load(&a.model)?;
    let prompts: Vec<Prompt> = read_prompt_file(&a.prompt_file)?
        .into_iter()
        .take(a.num_prompts)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams::default(),
        eos_ids: vec![], // fixed length: every prompt decodes max_new_tokens tokens
    };
    // Warm-up: allocator, kernels, thread pool.
    let warm = encode(&p, &prompts[0].text, true)?;
    let engine = engine(&p, None, &a.model, 0)?;
    plain::generate(
        &engine,
        &warm,
        &GenerateOptions {
            max_new_tokens: 8,
            ..opts.clone()
        },
        |_| {},
    )?;
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for prompt in &prompts {
        let ids = encode(&p, &prompt.text, true)?;
        let g = plain::generate(&engine, &ids, &opts, |_| {})?;
        tokens += g.stats.decode_tokens();
        seconds += g.stats.decode_seconds;
        eprintln!("[{}] {:.2} tok/s", prompt.id, g.stats.decode_tokens_per_s());
    }
    let kind = p.model.kind;
    // The floor: a plain streaming read on CPU (not any product kernel, whose own speed is what
    // is measured); on CUDA a large matrix-vector product.
    let bandwidth = if p.model.device == tch::Device::Cpu {
        let pool = eesd_core::native::pool::global();
        eesd_core::native::stream_read_bandwidth(pool, 1 << 30, 5)
    } else {
        eesd_infer::bench::matvec_bandwidth(p.model.device, kind, 8192, 20)
    };
    let bytes_per_token =
        p.model.cfg.weight_params_per_token() as f64 * kind.elt_size_in_bytes() as f64;
    let floor = bandwidth / bytes_per_token;
    let ours = tokens as f64 / seconds;
    let report = serde_json::json!({
        "prompts": prompts.len(), "max_new_tokens": a.max_new_tokens, "decode_tokens": tokens,
        "decode_seconds": seconds, "decode_tokens_per_s": ours,
        "bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_token": bytes_per_token,
        "floor_tokens_per_s": floor, "fraction_of_floor": ours / floor,
        "threads": tch::get_num_threads(), "device": format!("{:?}", p.model.device), "dtype": format!("{kind:?}"),
        "kernels": format!("{:?}", engine.kernels()),
    });
    eprintln!(
        "plain decode {ours:.2} tok/s; bandwidth {:.1} GB/s -> floor {floor:.2} tok/s ({:.0}% of floor)",
        bandwidth / 1e9,
        100.0 * ours / floor
    );
    if let Some(path) = a.json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{report}");
    Ok(())
}

fn bench_spec(a: SpecBenchArgs) -> Result<()> {
    let mut names: Vec<String> = a
        .controllers
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !names.iter().any(|n| n == "off") {
        names.insert(0, "off".into());
    }
    for n in &names {
        controller::parse(
            n,
            &ThompsonConfig {
                k_max: a.max_draft,
                ..Default::default()
            },
        )?;
    }
    draft_limit(a.max_draft, a.max_new_tokens)?;
    let p = load(&a.model)?;
    let head = load_head(&p, &Some(a.head.clone()))?.expect("head given");
    let mut datasets = Vec::new();
    for spec in &a.data {
        let rows = eesd_core::corpus::read_prompts(spec, "prompt")?;
        let name = std::path::Path::new(spec)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.clone());
        let mut prompts = Vec::new();
        for r in rows {
            let ids = p.tokenizer.encode_chat(&r.prompt)?;
            if ids.len() <= a.max_prompt_tokens {
                prompts.push((r.id, ids));
            }
            if prompts.len() == a.num_prompts {
                break;
            }
        }
        datasets.push(eesd_infer::bench_spec::Dataset { name, prompts });
    }
    let engine = engine(&p, Some(&head), &a.model, a.max_draft)?;
    let mut costs = CostTracker::calibrate(&engine, a.max_draft, 64, 5);
    let c = costs.costs();
    eprintln!(
        "cost model: draft step c = {:.3} of a full step; verify k+1 positions: {:?}",
        c.draft_step,
        c.verify
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    let opts = spec_options(
        &p,
        GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling: SamplingParams::new(a.temperature, 0, a.top_p)?,
            eos_ids: p.tokenizer.eos_ids.clone(),
        },
    );
    let make = |n: &str| -> eesd_core::Result<Box<dyn Controller>> {
        make_controller(n, Some(&head), a.max_draft, 0)
            .map_err(|e| eesd_core::Error::Input(format!("{e:#}")))
    };
    let total: usize = datasets.iter().map(|d| d.prompts.len()).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    let rows =
        eesd_infer::bench_spec::run(&engine, &datasets, &names, &make, &mut costs, &opts, |m| {
            bar.set_message(m.to_string());
            bar.inc(1);
        })?;
    bar.finish_and_clear();
    let table = eesd_infer::bench_spec::table(&rows);
    println!("{table}");
    std::fs::create_dir_all(&a.out)?;
    let report = serde_json::json!({
        "model": p.dir.display().to_string(), "head": a.head.display().to_string(),
        "device": format!("{:?}", p.model.device), "dtype": format!("{:?}", p.model.kind),
        "threads": tch::get_num_threads(), "max_new_tokens": a.max_new_tokens,
        "prompts_per_dataset": a.num_prompts, "exit_layer": head.spec.exit_layer,
        "draft_vocab": head.draft_vocab_size(),
        "cost_model": {"draft_step": costs.costs().draft_step, "verify": costs.costs().verify},
        "rows": rows,
    });
    std::fs::write(
        a.out.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("bench.md"), &table)?;
    eprintln!("wrote {}/bench.json and bench.md", a.out.display());
    let mismatched: Vec<String> = rows
        .iter()
        .filter(|r| r.mismatches > 0)
        .map(|r| format!("{} {}: {}", r.dataset, r.controller, r.mismatches))
        .collect();
    if a.require_identical && !mismatched.is_empty() {
        bail!(
            "speculative output differs from plain decoding: {}",
            mismatched.join(", ")
        );
    }
    Ok(())
}

fn bench_shape(a: ShapeArgs) -> Result<()> {
    use eesd_infer::bench::shape;
    let cfg = eesd_core::config::LlamaConfig::named_shape(&a.shape).with_context(|| {
        format!(
            "unknown shape `{}`: llama2-7b, llama2-13b, llama2-70b, smollm2-135m",
            a.shape
        )
    })?;
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(a.dtype.as_deref(), device)?;
    let exits: Vec<usize> = a
        .exit_layers
        .split(',')
        .map(|x| {
            x.trim()
                .parse()
                .with_context(|| format!("bad exit layer `{x}`"))
        })
        .collect::<Result<_>>()?;
    let bytes = cfg.weight_params_per_token() as f64 * kind.elt_size_in_bytes() as f64;
    eprintln!(
        "{}: {:.2} GB of weights in {kind:?} on {device:?}",
        a.shape,
        bytes / 1e9
    );
    let base = eesd_core::model::Llama::random(cfg, kind, device);
    let bandwidth = shape::bandwidth(device, kind);
    let floor = bandwidth / bytes;
    let graphs = eesd_core::cuda_graph::available(device);
    // Eager first, then with CUDA graphs where they run (the engine's default there).
    let eager_step = shape::plain_step(&base, a.context, 30, false);
    let step = if graphs {
        shape::plain_step(&base, a.context, 30, true)
    } else {
        eager_step
    };
    eprintln!(
        "bandwidth {:.0} GB/s -> floor {floor:.1} tok/s; plain decode eager {:.1} tok/s ({:.0}% of floor){}",
        bandwidth / 1e9,
        1.0 / eager_step,
        100.0 / eager_step / floor,
        if graphs {
            format!(
                ", CUDA graphs {:.1} tok/s ({:.0}% of floor)",
                1.0 / step,
                100.0 / step / floor
            )
        } else {
            String::new()
        }
    );
    // How much of a step the weight products alone take, at one row and at the verify width
    // every step runs (9): what is left is the small kernels around them.
    let width = eesd_infer::speculative::DEFAULT_VERIFY_WIDTH as i64;
    let w1 = shape::weight_pass(&base, 1, graphs);
    let ww = shape::weight_pass(&base, width, graphs);
    eprintln!(
        "weight products alone{}: 1 row {:.2} ms, {width} rows {:.2} ms; whole step {:.2} ms; floor {:.2} ms",
        if graphs { " (one graph)" } else { "" },
        w1 * 1e3,
        ww * 1e3,
        step * 1e3,
        1e3 / floor
    );
    let mut per_exit = Vec::new();
    for &n in &exits {
        let (c, v) = shape::spec_costs(&base, n, a.draft_vocab, a.max_draft, a.context);
        eprintln!(
            "N = {n}: draft step c = {c:.3}; verify k+1 = 1..{}: {:?}",
            a.max_draft + 1,
            v.iter()
                .map(|x| (x * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
        per_exit
            .push(serde_json::json!({"exit_layer": n, "draft_step_c": c, "verify_relative": v}));
    }
    let device_name = if device.is_cuda() { "cuda" } else { "cpu" };
    let report = serde_json::json!({
        "shape": a.shape, "device": device_name, "dtype": format!("{kind:?}"), "context": a.context,
        "weight_bytes": bytes, "bandwidth_bytes_per_s": bandwidth, "floor_tokens_per_s": floor,
        "plain_tokens_per_s": 1.0 / step, "fraction_of_floor": 1.0 / step / floor,
        "cuda_graphs": graphs, "plain_eager_tokens_per_s": 1.0 / eager_step,
        "weight_products_seconds": {"rows_1": w1, "rows_verify_width": ww, "verify_width": width},
        "draft_vocab": a.draft_vocab, "exits": per_exit,
    });
    println!("{report}");
    if let Some(path) = a.json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn bench_kernels(a: KernelArgs) -> Result<()> {
    let cfg = eesd_core::config::LlamaConfig::named_shape(&a.shape)
        .with_context(|| format!("unknown shape `{}`", a.shape))?;
    let kinds = a
        .dtypes
        .split(',')
        .map(|d| Ok(parse_dtype(Some(d.trim()), tch::Device::Cpu)?))
        .collect::<Result<Vec<_>>>()?;
    let rows = a
        .rows
        .split(',')
        .map(|r| {
            r.trim()
                .parse::<usize>()
                .ok()
                .filter(|&r| (1..=64).contains(&r))
                .with_context(|| format!("bad row count `{r}` (1..=64)"))
        })
        .collect::<Result<Vec<_>>>()?;
    let report = eesd_infer::bench::kernels::run(&cfg, &kinds, &rows, a.context, a.reps.max(1));
    println!("{report}");
    if let Some(path) = a.json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Generate(a) => generate(a),
        Command::BenchDecode(a) => bench_decode(a),
        Command::Bench(a) => bench_spec(a),
        Command::BenchShape(a) => bench_shape(a),
        Command::BenchKernels(a) => bench_kernels(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
