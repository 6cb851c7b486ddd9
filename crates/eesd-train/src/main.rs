//! `eesd-train`: make teacher data with the base model, then distil the early-exit head.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use eesd_train::{distill, recipe, teacher};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "eesd-train",
    version,
    about = "Self-distil an early-exit draft head from a frozen LLaMA"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Let the base model answer corpus prompts (teacher data, parquet).
    Gen(teacher::GenArgs),
    /// Train the early-exit head on teacher data.
    Distill(distill::DistillArgs),
    /// Run a recipe: `[gen]` then `[distill]` from a TOML file whose keys are the flags of the
    /// two subcommands (`exit_layer = 8` is `--exit-layer 8`; lists repeat the flag).
    Run {
        /// The recipe (see configs/).
        config: PathBuf,
        /// Skip `[gen]` (teacher data already made).
        #[arg(long)]
        skip_gen: bool,
        /// Run only the `[gen*]` tables: the teacher data, for the feature trainer
        /// (`just train-features`) or a later `--skip-gen` run.
        #[arg(long, conflicts_with = "skip_gen")]
        gen_only: bool,
    },
}

/// Runs a recipe: every table parsed and checked first ([`recipe::parse`]), the outputs of
/// `[distill]` checked too, then the `[gen*]` stages and `[distill]`.
fn run_recipe(path: &PathBuf, skip_gen: bool, gen_only: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let r = recipe::parse(&text, path, skip_gen, gen_only)?;
    if let Some(a) = &r.distill {
        a.check_outputs()
            .with_context(|| format!("{} [distill]", path.display()))?;
    }
    for (name, a) in &r.gens {
        eprintln!("recipe: [{name}]");
        teacher::run(a)?;
    }
    if let Some(a) = r.distill {
        eprintln!("recipe: [distill]");
        distill::run(&a)?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Gen(a) => teacher::run(&a),
        Command::Distill(a) => distill::run(&a).map(|_| ()),
        Command::Run {
            config,
            skip_gen,
            gen_only,
        } => run_recipe(&config, skip_gen, gen_only),
    };
    if let Err(e) = result {
        // A reader that closed stdout (`| head`) ends the command quietly.
        if eesd_core::error::is_closed_pipe(e.chain()) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
