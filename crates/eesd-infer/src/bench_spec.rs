//! `eesd-infer bench`: every controller on the same prompts in one process, interleaved per
//! prompt so that machine noise hits all of them alike; speedups are against `off` (plain
//! decoding through the same engine) measured in the same run.

use crate::controller::Controller;
use crate::cost::CostTracker;
use crate::speculative::{generate, Engine, SpecOptions};
use crate::stats::DecodeStats;
use eesd_core::Result;
use serde::Serialize;

/// One dataset's prompts (token ids, chat-formatted).
pub struct Dataset {
    pub name: String,
    pub prompts: Vec<(String, Vec<u32>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub dataset: String,
    pub controller: String,
    pub decode_tokens_per_s: f64,
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

/// Runs `controllers` (built fresh per dataset by `make`) over every dataset.
pub fn run(
    engine: &Engine,
    datasets: &[Dataset],
    names: &[String],
    make: &dyn Fn(&str) -> Result<Box<dyn Controller>>,
    costs: &mut CostTracker,
    opts: &SpecOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>> {
    // Warm-up: every controller once, short, so allocation and first-call costs stay out.
    if let Some((_, p)) = datasets.first().and_then(|d| d.prompts.first()) {
        let mut short = opts.clone();
        short.gen.max_new_tokens = 16.min(opts.gen.max_new_tokens);
        for name in names {
            generate(engine, p, &short, make(name)?.as_mut(), costs, |_| {})?;
        }
    }
    let mut rows = Vec::new();
    for d in datasets {
        let mut ctrls: Vec<Box<dyn Controller>> =
            names.iter().map(|n| make(n)).collect::<Result<_>>()?;
        let mut totals = vec![DecodeStats::default(); names.len()];
        let mut mismatches = vec![0usize; names.len()];
        for (id, prompt) in &d.prompts {
            let mut reference: Option<Vec<u32>> = None;
            for (i, c) in ctrls.iter_mut().enumerate() {
                let g = generate(engine, prompt, opts, c.as_mut(), costs, |_| {})?;
                // Sampled outputs differ run to run by design; only greedy ones must be equal.
                let greedy = opts.gen.sampling.is_greedy();
                match &reference {
                    _ if !greedy => {}
                    None => reference = Some(g.ids.clone()),
                    Some(r) if *r != g.ids => mismatches[i] += 1,
                    _ => {}
                }
                totals[i].merge(&g.stats);
            }
            progress(&format!("{} {id}", d.name));
        }
        let off = names
            .iter()
            .position(|n| n == "off")
            .map(|i| totals[i].decode_tokens_per_s());
        for (i, name) in names.iter().enumerate() {
            let s = &totals[i];
            rows.push(Row {
                dataset: d.name.clone(),
                controller: name.clone(),
                decode_tokens_per_s: s.decode_tokens_per_s(),
                speedup_vs_off: off.map(|o| s.decode_tokens_per_s() / o).unwrap_or(f64::NAN),
                predicted_speedup: s.predicted_speedup(&costs.costs()),
                acceptance_rate: s.acceptance_rate(),
                mean_accepted_length: s.mean_accepted_length(),
                mean_draft_length: s.mean_draft_length(),
                accepted_by_position: s.accepted_by_position(),
                new_tokens: s.new_tokens,
                mismatches: mismatches[i],
                temperature: opts.gen.sampling.temperature,
            });
        }
    }
    Ok(rows)
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| dataset | controller | decode tok/s | speedup vs off | predicted | acceptance | mean accepted length | mean draft length | mismatches |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2}x | {:.2}x | {:.1}% | {:.2} | {:.2} | {} |\n",
            r.dataset,
            r.controller,
            r.decode_tokens_per_s,
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
