//! `eesd-train`: make teacher data with the base model, then distil the early-exit head.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use eesd_train::{distill, teacher};
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

/// TOML table -> the equivalent command line, so recipes and flags share one definition.
fn table_to_args(sub: &str, table: &toml::Table) -> Result<Vec<String>> {
    let mut args = vec!["eesd-train".to_string(), sub.to_string()];
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let mut push = |v: &toml::Value| -> Result<()> {
            match v {
                toml::Value::Boolean(true) => args.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                // `--flag=value`, so a negative number is a value, not another flag.
                toml::Value::String(s) => args.push(format!("{flag}={s}")),
                toml::Value::Integer(i) => args.push(format!("{flag}={i}")),
                toml::Value::Float(f) => args.push(format!("{flag}={f}")),
                other => bail!("[{sub}] {k}: unsupported value {other}"),
            }
            Ok(())
        };
        match v {
            toml::Value::Array(items) => items.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    Ok(args)
}

/// One recipe table parsed as the subcommand's flags; clap's own "error: " prefix is dropped
/// (main adds one).
fn parse_table(
    path: &std::path::Path,
    name: &str,
    sub: &str,
    table: &toml::Table,
) -> Result<Command> {
    Cli::try_parse_from(table_to_args(sub, table)?)
        .map(|c| c.cmd)
        .map_err(|e| {
            let msg = e.render().to_string();
            anyhow::anyhow!(
                "{} [{name}]: {}",
                path.display(),
                msg.trim().trim_start_matches("error: ")
            )
        })
}

/// Runs a recipe's `[gen*]` tables, then `[distill]`. Every table is parsed and checked before
/// the first stage runs, so a typo in `[distill]` is reported before hours of generation.
fn run_recipe(path: &PathBuf, skip_gen: bool, gen_only: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let recipe: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    // Every table named gen* (e.g. [gen] for training data, [gen_eval] for held-out data).
    let mut gens = Vec::new();
    for (name, table) in recipe
        .iter()
        .filter(|(k, _)| k.starts_with("gen") && !skip_gen)
    {
        let table = table
            .as_table()
            .with_context(|| format!("{} [{name}] must be a table", path.display()))?;
        match parse_table(path, name, "gen", table)? {
            Command::Gen(a) => {
                a.validate()
                    .with_context(|| format!("{} [{name}]", path.display()))?;
                gens.push((name.clone(), a));
            }
            _ => unreachable!("parsed as gen"),
        }
    }
    let distill = if gen_only {
        None
    } else {
        let table = recipe
            .get("distill")
            .and_then(|v| v.as_table())
            .with_context(|| format!("{} has no [distill] table", path.display()))?;
        match parse_table(path, "distill", "distill", table)? {
            Command::Distill(a) => {
                a.validate()
                    .and_then(|()| a.check_outputs())
                    .with_context(|| format!("{} [distill]", path.display()))?;
                Some(a)
            }
            _ => unreachable!("parsed as distill"),
        }
    };
    for (name, a) in &gens {
        eprintln!("recipe: [{name}]");
        teacher::run(a)?;
    }
    if let Some(a) = distill {
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
