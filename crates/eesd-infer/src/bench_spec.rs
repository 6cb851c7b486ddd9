//! `eesd-infer bench`: every controller on the same prompts in one process, interleaved per
//! prompt so that machine noise hits all of them alike; speedups are against `off` (plain
//! decoding through the same engine) measured in the same run.

use crate::controller::Controller;
use crate::engine::{Backend, DraftSources, Engine, GenerateOptions};
use crate::stats::DecodeStats;
use eesd_core::Result;
use serde::Serialize;

/// One dataset's prompts (token ids, chat-formatted).
pub struct Dataset {
    pub name: String,
    pub prompts: Vec<(String, Vec<u32>)>,
}

/// The first `num_prompts` prompts of each corpus (parquet with `id` and `prompt`) whose chat
/// form fits `max_prompt_tokens`; a dataset is named after its file.
pub fn load_datasets(
    tokenizer: &eesd_core::tokenizer::Tokenizer,
    specs: &[String],
    num_prompts: usize,
    max_prompt_tokens: usize,
) -> Result<Vec<Dataset>> {
    let mut datasets = Vec::new();
    for spec in specs {
        let rows = eesd_core::corpus::read_prompts(spec, "prompt")?;
        let name = std::path::Path::new(spec)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.clone());
        let mut prompts = Vec::new();
        for r in rows {
            let ids = tokenizer.encode_chat(&r.prompt)?;
            if ids.len() <= max_prompt_tokens {
                prompts.push((r.id, ids));
            }
            if prompts.len() == num_prompts {
                break;
            }
        }
        if prompts.is_empty() {
            return Err(eesd_core::Error::Input(format!(
                "no prompt of {spec} fits --max-prompt-tokens {max_prompt_tokens} (chat-formatted)"
            )));
        }
        datasets.push(Dataset { name, prompts });
    }
    Ok(datasets)
}

/// Controller names from a comma-separated list, `off` first when missing (speedups are
/// against it); a name listed twice is refused (it would give two rows of the same thing).
pub fn controller_names(list: &str) -> std::result::Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for n in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if names.iter().any(|m| m == n) {
            return Err(format!("--controllers lists `{n}` twice"));
        }
        split_sources(n, DraftSources::HEAD)?;
        names.push(n.to_string());
    }
    if !names.iter().any(|n| n == "off") {
        names.insert(0, "off".into());
    }
    Ok(names)
}

/// A bench entry `NAME` or `NAME@SOURCES` (`thompson@lookup`, `thompson@head+lookup`): the
/// controller's name and the draft sources its row runs with (`default` without a suffix).
pub fn split_sources(
    entry: &str,
    default: DraftSources,
) -> std::result::Result<(&str, DraftSources), String> {
    match entry.split_once('@') {
        Some((name, sources)) => Ok((name, DraftSources::parse(sources)?)),
        None => Ok((entry, default)),
    }
}

/// Rows whose greedy output differed from plain decoding, as "dataset controller: count".
pub fn mismatches(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.mismatches > 0)
        .map(|r| format!("{} {}: {}", r.dataset, r.controller, r.mismatches))
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub dataset: String,
    pub controller: String,
    pub decode_tokens_per_s: f64,
    /// Prompt tokens per second of prefill, and new tokens per second prefill included.
    pub prefill_tokens_per_s: f64,
    pub prefill_seconds: f64,
    pub end_to_end_tokens_per_s: f64,
    pub speedup_vs_off: f64,
    /// The cost model's prediction for the same rounds (see `DecodeStats::predicted_speedup`).
    pub predicted_speedup: f64,
    pub acceptance_rate: f64,
    pub mean_accepted_length: f64,
    pub mean_draft_length: f64,
    pub accepted_by_position: Vec<f64>,
    pub new_tokens: usize,
    /// Prompts whose output differed from `off` (greedy must give 0; not compared when
    /// sampling).
    pub mismatches: usize,
    /// The sampling temperature of the row (0 = greedy).
    pub temperature: f64,
}

/// Runs `controllers` (built fresh per dataset by `make`) over every dataset. After each
/// prompt `progress` sees a label and the rows so far (finished datasets, then the current one
/// over the prompts it has run), so a caller can write results as they come.
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    engine: &mut Engine<B>,
    datasets: &[Dataset],
    names: &[String],
    sources: DraftSources,
    make: &dyn Fn(&str) -> Result<Box<dyn Controller>>,
    opts: &GenerateOptions,
    mut progress: impl FnMut(&str, &[Row]) -> Result<()>,
) -> Result<Vec<Row>> {
    let entries: Vec<(&str, DraftSources)> = names
        .iter()
        .map(|n| split_sources(n, sources).map_err(eesd_core::Error::Input))
        .collect::<Result<_>>()?;
    // Warm-up: every controller once, short, so allocation and first-call costs stay out.
    if let Some((_, p)) = datasets.first().and_then(|d| d.prompts.first()) {
        let mut short = opts.clone();
        short.max_new_tokens = 16.min(opts.max_new_tokens);
        for &(name, src) in &entries {
            engine.sources = src;
            engine.generate(p, &short, make(name)?.as_mut(), |_| {})?;
        }
    }
    let mut rows = Vec::new();
    for d in datasets {
        let mut ctrls: Vec<Box<dyn Controller>> = entries
            .iter()
            .map(|(n, _)| make(n))
            .collect::<Result<_>>()?;
        let mut totals = vec![DecodeStats::default(); names.len()];
        let mut mismatches = vec![0usize; names.len()];
        for (id, prompt) in &d.prompts {
            let mut reference: Option<Vec<u32>> = None;
            for (i, c) in ctrls.iter_mut().enumerate() {
                engine.sources = entries[i].1;
                let g = engine.generate(prompt, opts, c.as_mut(), |_| {})?;
                // Sampled outputs differ run to run by design; only greedy ones must be equal.
                let greedy = opts.sampling.is_greedy();
                match &reference {
                    _ if !greedy => {}
                    None => reference = Some(g.ids.clone()),
                    Some(r) if *r != g.ids => mismatches[i] += 1,
                    _ => {}
                }
                totals[i].merge(&g.stats);
            }
            let current = dataset_rows(&d.name, names, &totals, &mismatches, engine, opts);
            let so_far: Vec<Row> = rows.iter().cloned().chain(current).collect();
            progress(&format!("{} {id}", d.name), &so_far)?;
        }
        rows.extend(dataset_rows(
            &d.name,
            names,
            &totals,
            &mismatches,
            engine,
            opts,
        ));
    }
    Ok(rows)
}

/// One row per controller of a dataset, from its summed statistics; speedups against `off`.
fn dataset_rows<B: Backend>(
    dataset: &str,
    names: &[String],
    totals: &[DecodeStats],
    mismatches: &[usize],
    engine: &Engine<B>,
    opts: &GenerateOptions,
) -> Vec<Row> {
    let off = names
        .iter()
        .position(|n| n == "off")
        .map(|i| totals[i].decode_tokens_per_s());
    names
        .iter()
        .zip(totals)
        .zip(mismatches)
        .map(|((name, s), &mismatches)| Row {
            dataset: dataset.to_string(),
            controller: name.clone(),
            decode_tokens_per_s: s.decode_tokens_per_s(),
            prefill_tokens_per_s: s.prefill_tokens_per_s(),
            prefill_seconds: s.prefill_seconds,
            end_to_end_tokens_per_s: s.end_to_end_tokens_per_s(),
            speedup_vs_off: off.map(|o| s.decode_tokens_per_s() / o).unwrap_or(f64::NAN),
            predicted_speedup: s.predicted_speedup(&engine.costs.costs()),
            acceptance_rate: s.acceptance_rate(),
            mean_accepted_length: s.mean_accepted_length(),
            mean_draft_length: s.mean_draft_length(),
            accepted_by_position: s.accepted_by_position(),
            new_tokens: s.new_tokens,
            mismatches,
            temperature: opts.sampling.temperature,
        })
        .collect()
}

/// What `bench.json` records besides the rows: the run's setup and its cost model.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub model: String,
    pub head: String,
    pub device: String,
    pub dtype: String,
    pub threads: i32,
    pub max_new_tokens: usize,
    pub prompts_per_dataset: usize,
    pub exit_layer: usize,
    pub draft_vocab: i64,
    pub cost_model: crate::controller::Costs,
}

/// Writes `bench.json` (the setup and the rows) and `bench.md` (the table) into `out`, each
/// through a temporary file renamed over the old one, so an interrupted run leaves the last
/// complete report.
pub fn write_report(out: &std::path::Path, setup: &Setup, rows: &[Row]) -> std::io::Result<()> {
    let mut report = serde_json::to_value(setup).expect("setup serialises");
    report["rows"] = serde_json::to_value(rows).expect("rows serialise");
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    write_atomic(&out.join("bench.json"), json.as_bytes())?;
    write_atomic(&out.join("bench.md"), table(rows).as_bytes())
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| dataset | controller | decode tok/s | prefill tok/s | end to end tok/s | speedup vs off | predicted | acceptance | mean accepted length | mean draft length | mismatches |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.1} | {:.2} | {:.2}x | {:.2}x | {:.1}% | {:.2} | {:.2} | {} |\n",
            r.dataset,
            r.controller,
            r.decode_tokens_per_s,
            r.prefill_tokens_per_s,
            r.end_to_end_tokens_per_s,
            r.speedup_vs_off,
            r.predicted_speedup,
            100.0 * r.acceptance_rate,
            r.mean_accepted_length,
            r.mean_draft_length,
            if r.temperature > 0.0 {
                format!("- (T = {})", r.temperature)
            } else {
                r.mismatches.to_string()
            }
        ));
    }
    s
}
