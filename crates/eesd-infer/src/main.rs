//! `eesd-infer`: generate text with a LLaMA-family model, and benchmark decoding.
//!
//! Generated text goes to stdout; progress and statistics go to stderr, so
//! `eesd-infer generate ... > out.txt` keeps only the text.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use eesd_core::device::{parse_device, parse_dtype};
use eesd_core::pretrained::Pretrained;
use eesd_core::sampling::SamplingParams;
use eesd_infer::plain::{self, GenerateOptions};
use eesd_infer::prompts::{read_prompt_file, Prompt};
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
}

/// Which model, where, in what precision.
#[derive(Args)]
struct ModelArgs {
    /// A local HF model folder (config.json, *.safetensors, tokenizer.json) or a hub id org/name.
    #[arg(long)]
    model: String,
    /// cpu, cuda or cuda:N [default: cuda when available, else cpu]
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16 [default: bf16 on cuda, f32 on cpu]
    #[arg(long)]
    dtype: Option<String>,
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
    let device = parse_device(args.device.as_deref())?;
    let kind = parse_dtype(args.dtype.as_deref(), device)?;
    let p = Pretrained::load(&args.model, device, kind)
        .with_context(|| format!("loading model {}", args.model))?;
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
    let p = load(&a.model)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    tch::manual_seed(a.seed);
    let stdout = std::io::stdout();
    for prompt in &prompts {
        let prompt_ids =
            encode(&p, &prompt.text, a.chat).with_context(|| format!("prompt {}", prompt.id))?;
        let mut printed = String::new();
        let stream = !a.json;
        let g = plain::generate(&p.model, &prompt_ids, &opts, |ids| {
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
        })
        .with_context(|| format!("prompt {}", prompt.id))?;
        let text = p.tokenizer.decode(&g.ids)?;
        let s = &g.stats;
        if a.json {
            let mut stats = s.to_json();
            stats["stop_reason"] = serde_json::to_value(g.stop)?;
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
        eprintln!(
            "[{}] prompt {} tok, {} new tok ({:?}), prefill {:.3}s, decode {:.2} tok/s",
            prompt.id,
            s.prompt_tokens,
            s.new_tokens,
            g.stop,
            s.prefill_seconds,
            s.decode_tokens_per_s()
        );
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
    plain::generate(
        &p.model,
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
        let g = plain::generate(&p.model, &ids, &opts, |_| {})?;
        tokens += g.stats.decode_tokens();
        seconds += g.stats.decode_seconds;
        eprintln!("[{}] {:.2} tok/s", prompt.id, g.stats.decode_tokens_per_s());
    }
    let kind = p.model.kind;
    let bandwidth = eesd_infer::bench::matvec_bandwidth(p.model.device, kind, 8192, 20);
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Generate(a) => generate(a),
        Command::BenchDecode(a) => bench_decode(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
