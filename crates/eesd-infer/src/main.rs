//! `eesd-infer`: generate text with a LLaMA-family model, and benchmark decoding.
//!
//! Generated text goes to stdout; progress and statistics go to stderr, so
//! `eesd-infer generate ... > out.txt` keeps only the text. Flags are parsed here; the engine,
//! the controllers' policy and the reports live in the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eesd_core::device::{parse_device, parse_dtype};
use eesd_core::head::EarlyExitHead;
use eesd_core::pretrained::Pretrained;
use eesd_core::sampling::SamplingParams;
use eesd_infer::backends::Kernels;
use eesd_infer::bench_spec;
use eesd_infer::controller::{self, DEFAULT_MAX_DRAFT};
use eesd_infer::engine::{Backend, DraftSources, Engine, GenerateOptions};
use eesd_infer::prompts::{read_prompt_file, Prompt, TextStream};
use eesd_infer::stats::DecodeStats;
use eesd_infer::with_engine;
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
    /// Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health, /metrics) with continuous batching and speculative decoding per request.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// The controller of requests that name none (a request's `controller` field overrides
    /// it) [default: thompson when drafts can come from a head or the lookup, else off]
    #[arg(long)]
    controller: Option<String>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed when listening).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Sequences decoded together in one pass of the weights; more requests wait.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests that may wait for a batch slot; past it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// The model id clients send and responses carry [default: the model folder's name].
    #[arg(long)]
    served_model_name: Option<String>,
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

/// Speculative decoding: the head, and how long a round's draft may be.
#[derive(Args)]
struct SpecArgs {
    /// A trained early-exit head folder (head.json + head.safetensors). Without it decoding is
    /// plain.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Most draft tokens per round.
    #[arg(long, default_value_t = DEFAULT_MAX_DRAFT)]
    max_draft: usize,
    /// Where drafts come from: head (the early-exit head's chain), lookup (tokens copied from
    /// the prompt and the text so far: pays on prompts that quote or edit given text; needs no
    /// head), or head,lookup (the copied tokens when a match is worth verifying, else the
    /// head's) [default: head]
    #[arg(long)]
    draft_sources: Option<String>,
}

impl SpecArgs {
    /// The draft sources, checked against the head before any work.
    fn sources(&self) -> Result<DraftSources> {
        let Some(s) = &self.draft_sources else {
            return Ok(DraftSources::HEAD);
        };
        let sources = DraftSources::parse(s).map_err(anyhow::Error::msg)?;
        if sources.head && self.head.is_none() {
            bail!("--draft-sources {s}: the head source needs --head DIR (or use --draft-sources lookup)");
        }
        Ok(sources)
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Draft-length controller: thompson, thompson-calibrated, fixed:K, heuristic, confidence:P,
    /// off [default: thompson with --head, else off]
    #[arg(long)]
    controller: Option<String>,
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
}

#[derive(Args)]
struct SpecBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: SpecArgs,
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
    /// `NAME@SOURCES` runs a controller with other draft sources than --draft-sources:
    /// `thompson@lookup`, `thompson@head+lookup`.
    #[arg(
        long,
        default_value = "off,thompson,thompson-calibrated,heuristic,confidence:0.5,fixed:1,fixed:2,fixed:3,fixed:4,fixed:6"
    )]
    controllers: String,
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
    /// Replace a bench.json already in --out (without it the run refuses to start).
    #[arg(long)]
    force: bool,
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
    #[arg(long, default_value_t = DEFAULT_MAX_DRAFT)]
    max_draft: usize,
    /// Prompt tokens in the cache while timing.
    #[arg(long, default_value_t = 256)]
    context: i64,
    #[arg(long)]
    json_out: Option<PathBuf>,
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

/// The model, described on stderr.
fn load(args: &ModelArgs) -> Result<Pretrained> {
    let p = args
        .base
        .load()
        .with_context(|| format!("loading model {}", args.base.model))?;
    if !p.unused_tensors.is_empty() {
        eprintln!(
            "note: {} checkpoint tensors unused: {:?}",
            p.unused_tensors.len(),
            p.unused_tensors
        );
    }
    let m = &p.model;
    eprintln!(
        "model {} ({} layers, hidden {}, vocab {}) on {:?} in {:?}",
        p.dir.display(),
        m.cfg.num_layers,
        m.cfg.hidden_size,
        m.cfg.vocab_size,
        m.device,
        m.kind
    );
    Ok(p)
}

/// Refuses a `--head` that is no head folder before the (slow) model load.
fn check_head_dir(dir: &Option<PathBuf>) -> Result<()> {
    if let Some(d) = dir {
        if !d.join("head.json").is_file() || !d.join("head.safetensors").is_file() {
            bail!(
                "--head {}: expected a head folder holding head.json and head.safetensors",
                d.display()
            );
        }
    }
    Ok(())
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

/// The decode kernels `args` ask for, checked against the device before the model loads.
fn kernels(args: &ModelArgs) -> Result<Kernels> {
    let device = parse_device(args.base.device.as_deref())?;
    parse_dtype(args.base.dtype.as_deref(), device)?;
    Ok(Kernels::parse(args.kernels.as_deref(), device)?)
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
    let sources = a.spec.sources()?;
    // Something to draft with: the head, or copied tokens.
    let can_draft = sources.can_draft(a.spec.head.is_some());
    let default = if can_draft { "thompson" } else { "off" };
    let name = a.controller.clone().unwrap_or_else(|| default.into());
    // The engine drafts at most what the generation can use; controllers are checked against
    // the flag the user set.
    let max_draft = controller::draft_limit(a.spec.max_draft, a.max_new_tokens)?;
    // Refuse a bad controller before the (slow) model load.
    controller::build(&name, can_draft, None, a.spec.max_draft, 0)?;
    let kernels = kernels(&a.model)?;
    check_head_dir(&a.spec.head)?;
    let p = load(&a.model)?;
    let head = load_head(&p, &a.spec.head)?;
    let mut ctrl = controller::build(
        &name,
        can_draft,
        controller::agreement(head.as_ref()),
        a.spec.max_draft,
        a.seed as u64,
    )?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    with_engine!(kernels, &p.model, head.as_ref(), max_draft, |engine| {
        engine.sources = sources;
        if head.is_some() {
            engine.calibrate(64, 3)?;
        }
        tch::manual_seed(a.seed);
        let mut total = DecodeStats::default();
        for prompt in &prompts {
            let ids = encode(&p, &prompt.text, a.chat)
                .with_context(|| format!("prompt {}", prompt.id))?;
            let stats = generate_one(
                &mut engine,
                &p,
                prompt,
                &ids,
                &opts,
                ctrl.as_mut(),
                a.json,
                &name,
            )?;
            total.merge(&stats);
        }
        if prompts.len() > 1 {
            eprintln!("{}", total.summary(&format!("total {name}")));
        }
    });
    Ok(())
}

/// One prompt: text streamed to stdout (or one JSON object), the summary to stderr.
#[allow(clippy::too_many_arguments)]
fn generate_one<B: Backend>(
    engine: &mut Engine<B>,
    p: &Pretrained,
    prompt: &Prompt,
    ids: &[u32],
    opts: &GenerateOptions,
    ctrl: &mut dyn controller::Controller,
    json: bool,
    name: &str,
) -> Result<DecodeStats> {
    let mut stream = TextStream::new(&p.tokenizer, !json);
    let g = engine
        .generate(ids, opts, ctrl, |ids| stream.push(ids))
        .with_context(|| format!("prompt {}", prompt.id))?;
    let text = p.tokenizer.decode(&g.ids)?;
    if json {
        let mut stats = g.stats.to_json();
        stats["stop_reason"] = serde_json::to_value(g.stop)?;
        stats["controller"] = name.into();
        stats["draft_sources"] = engine.sources.name().into();
        let obj = serde_json::json!({
            "id": prompt.id, "text": text, "prompt_ids": ids, "ids": g.ids, "stats": stats,
        });
        out_line(&obj.to_string())?;
    } else {
        stream.finish(&text)?;
    }
    eprintln!(
        "{}",
        g.stats
            .summary(&format!("[{}] {name} ({:?})", prompt.id, g.stop))
    );
    Ok(g.stats)
}

fn bench_decode(a: BenchArgs) -> Result<()> {
    let kernels = kernels(&a.model)?;
    let p = load(&a.model)?;
    let prompts: Vec<Vec<u32>> = read_prompt_file(&a.prompt_file)?
        .into_iter()
        .take(a.num_prompts)
        .map(|pr| encode(&p, &pr.text, true))
        .collect::<Result<_>>()?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams::default(),
        eos_ids: vec![], // fixed length: every prompt decodes max_new_tokens tokens
    };
    let measured = with_engine!(kernels, &p.model, None, 1, |engine| {
        eesd_infer::bench::plain_decode(&mut engine, &prompts, &opts)?
    });
    let r = eesd_infer::bench::DecodeReport::measure(
        &p.model,
        kernels,
        prompts.len(),
        a.max_new_tokens,
        measured,
    );
    eprintln!(
        "plain decode {:.2} tok/s; bandwidth {:.1} GB/s -> floor {:.2} tok/s ({:.0}% of floor)",
        r.decode_tokens_per_s,
        r.bandwidth_bytes_per_s / 1e9,
        r.floor_tokens_per_s,
        100.0 * r.fraction_of_floor
    );
    let report = serde_json::to_value(&r)?;
    write_json(a.json_out.as_ref(), &report)?;
    out_line(&report.to_string())?;
    Ok(())
}

fn bench_spec(a: SpecBenchArgs) -> Result<()> {
    // Everything the user can get wrong, before the model loads.
    if a.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    let names = bench_spec::controller_names(&a.controllers).map_err(anyhow::Error::msg)?;
    let sources = a.spec.sources()?;
    controller::draft_limit(a.spec.max_draft, a.max_new_tokens)?;
    for n in &names {
        let (base, _) = bench_spec::split_sources(n, sources).map_err(anyhow::Error::msg)?;
        controller::build(base, true, None, a.spec.max_draft, 0)?;
    }
    let sampling = SamplingParams::new(a.temperature, 0, a.top_p)?;
    let Some(head_dir) = &a.spec.head else {
        bail!("bench compares controllers that draft: give --head DIR");
    };
    let kernels = kernels(&a.model)?;
    check_head_dir(&a.spec.head)?;
    prepare_out(&a.out, a.force)?;
    let p = load(&a.model)?;
    let head = load_head(&p, &a.spec.head)?.context("head given")?;
    let datasets =
        bench_spec::load_datasets(&p.tokenizer, &a.data, a.num_prompts, a.max_prompt_tokens)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    let make = |n: &str| {
        controller::build(
            n,
            true,
            controller::agreement(Some(&head)),
            a.spec.max_draft,
            0,
        )
        .map_err(|e| eesd_core::Error::Input(e.to_string()))
    };
    let setup = |costs| bench_spec::Setup {
        model: p.dir.display().to_string(),
        head: head_dir.display().to_string(),
        device: format!("{:?}", p.model.device),
        dtype: format!("{:?}", p.model.kind),
        threads: tch::get_num_threads(),
        max_new_tokens: a.max_new_tokens,
        prompts_per_dataset: a.num_prompts,
        exit_layer: head.spec.exit_layer,
        draft_vocab: head.draft_vocab_size(),
        cost_model: costs,
    };
    // The report is rewritten after every prompt, so an interrupted run keeps what it measured.
    let write = |costs, rows: &[bench_spec::Row]| {
        bench_spec::write_report(&a.out, &setup(costs), rows)
            .with_context(|| format!("writing {}/bench.json and bench.md", a.out.display()))
    };
    let total: usize = datasets.iter().map(|d| d.prompts.len()).sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    let (rows, costs) = with_engine!(kernels, &p.model, Some(&head), a.spec.max_draft, |engine| {
        engine.calibrate(64, 5)?;
        let c = engine.costs.costs();
        eprintln!(
            "cost model: draft step c = {:.3} of a full step; verify k+1 positions: {:?}",
            c.draft_step,
            c.verify
                .iter()
                .map(|v| (v * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
        let rows = bench_spec::run(
            &mut engine,
            &datasets,
            &names,
            sources,
            &make,
            &opts,
            |m, rows| {
                bar.set_message(m.to_string());
                bar.inc(1);
                write(c.clone(), rows).map_err(|e| eesd_core::Error::Input(format!("{e:#}")))
            },
        )?;
        (rows, engine.costs.costs())
    });
    bar.finish_and_clear();
    out_line(&bench_spec::table(&rows))?;
    write(costs, &rows)?;
    eprintln!("wrote {}/bench.json and bench.md", a.out.display());
    let mismatched = bench_spec::mismatches(&rows);
    if a.require_identical && !mismatched.is_empty() {
        bail!(
            "speculative output differs from plain decoding: {}",
            mismatched.join(", ")
        );
    }
    Ok(())
}

/// Creates `out` (or checks it), refusing to replace a report there unless `force`, and proves
/// it writable before any work.
fn prepare_out(out: &std::path::Path, force: bool) -> Result<()> {
    let report = out.join("bench.json");
    if report.exists() && !force {
        bail!(
            "{} exists: give --force to replace it, or another --out",
            report.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let probe = out.join(".bench-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{} is not writable", out.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("cleaning {}", probe.display()))?;
    Ok(())
}

fn bench_shape(a: ShapeArgs) -> Result<()> {
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
    let report = eesd_infer::bench::shape::run(
        &a.shape,
        cfg,
        device,
        kind,
        &exits,
        a.draft_vocab,
        a.max_draft,
        a.context,
    )?;
    out_line(&report.to_string())?;
    write_json(a.json_out.as_ref(), &report)
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
    out_line(&report.to_string())?;
    write_json(a.json_out.as_ref(), &report)
}

fn serve(a: ServeArgs) -> Result<()> {
    // Everything the user can get wrong, before the model loads.
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let sources = a.spec.sources()?;
    let can_draft = sources.can_draft(a.spec.head.is_some());
    if let Some(c) = &a.controller {
        controller::build(c, can_draft, None, a.spec.max_draft, 0)?;
    }
    controller::draft_limit(a.spec.max_draft, usize::MAX)?;
    let kernels = kernels(&a.model)?;
    check_head_dir(&a.spec.head)?;
    let addr = format!("{}:{}", a.host, a.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first: a taken port is an error before the (slow) model load.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("listening on {addr}"))?;
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        PathBuf::from(&a.model.base.model)
            .file_name()
            .map_or(a.model.base.model.clone(), |n| {
                n.to_string_lossy().into_owned()
            })
    });
    let cfg = eesd_infer::serve::ServeConfig {
        kernels,
        max_draft: a.spec.max_draft,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        controller: a.controller.clone(),
        sources,
        model_name,
        calibrate: true,
    };
    let (model_args, head_dir) = (a.model, a.spec.head.clone());
    let server = eesd_infer::serve::start(cfg, move || {
        let p = load(&model_args)?;
        let head = load_head(&p, &head_dir)?;
        Ok((p, head))
    })?;
    eprintln!(
        "listening on http://{} (max batch {}, queue {})",
        listener.local_addr()?,
        a.max_batch,
        a.max_queue
    );
    runtime.block_on(server.serve(listener))?;
    eprintln!("stopped");
    Ok(())
}

/// One line on stdout; a closed pipe comes back as an error (see [`main`]).
fn out_line(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn write_json(path: Option<&PathBuf>, report: &serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
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
        Command::Serve(a) => serve(a),
    };
    if let Err(e) = result {
        // A reader that closed stdout (`| head`) ends the command quietly, as `head` users
        // expect of a Unix tool.
        if eesd_core::error::is_closed_pipe(e.chain()) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
