//! Training recipes: a TOML file whose `[gen*]` and `[distill]` tables hold the flags of the
//! two subcommands (`exit_layer = 8` is `--exit-layer 8`; lists repeat the flag), so recipes
//! and the command line share one definition and one set of checks.

use crate::distill::DistillArgs;
use crate::teacher::GenArgs;
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::Path;

/// A recipe's stages, parsed and checked, in the order they run.
#[derive(Debug)]
pub struct Recipe {
    /// Every table named gen* (e.g. `[gen]` for training data, `[gen_eval]` for held-out data).
    pub gens: Vec<(String, GenArgs)>,
    /// `None` when only the teacher data is wanted.
    pub distill: Option<DistillArgs>,
}

#[derive(Parser)]
#[command(name = "gen")]
struct GenLine {
    #[command(flatten)]
    args: GenArgs,
}

#[derive(Parser)]
#[command(name = "distill")]
struct DistillLine {
    #[command(flatten)]
    args: DistillArgs,
}

/// TOML table -> the equivalent flags, as `--flag=value` so a negative number is a value.
pub fn table_to_flags(table: &toml::Table) -> Result<Vec<String>> {
    let mut args = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let mut push = |v: &toml::Value| -> Result<()> {
            match v {
                toml::Value::Boolean(true) => args.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => args.push(format!("{flag}={s}")),
                toml::Value::Integer(i) => args.push(format!("{flag}={i}")),
                toml::Value::Float(f) => args.push(format!("{flag}={f}")),
                other => bail!("{k}: unsupported value {other}"),
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

/// One table parsed as `P`'s flags; clap's own "error: " prefix is dropped (the binary adds
/// one) and the table is named instead.
fn parse_table<P: Parser>(origin: &Path, name: &str, sub: &str, table: &toml::Table) -> Result<P> {
    let flags = table_to_flags(table).with_context(|| format!("{} [{name}]", origin.display()))?;
    P::try_parse_from(std::iter::once(sub.to_string()).chain(flags)).map_err(|e| {
        let msg = e.render().to_string();
        anyhow::anyhow!(
            "{} [{name}]: {}",
            origin.display(),
            msg.trim().trim_start_matches("error: ")
        )
    })
}

/// Parses and checks every table of the recipe `text` (read from `origin`) before any stage
/// runs, so a typo in `[distill]` is reported before hours of generation.
pub fn parse(text: &str, origin: &Path, skip_gen: bool, gen_only: bool) -> Result<Recipe> {
    let recipe: toml::Table =
        toml::from_str(text).with_context(|| format!("parsing {}", origin.display()))?;
    let mut gens = Vec::new();
    for (name, table) in recipe
        .iter()
        .filter(|(k, _)| k.starts_with("gen") && !skip_gen)
    {
        let table = table
            .as_table()
            .with_context(|| format!("{} [{name}] must be a table", origin.display()))?;
        let a = parse_table::<GenLine>(origin, name, "gen", table)?.args;
        a.validate()
            .with_context(|| format!("{} [{name}]", origin.display()))?;
        gens.push((name.clone(), a));
    }
    let distill = if gen_only {
        None
    } else {
        let table = recipe
            .get("distill")
            .and_then(|v| v.as_table())
            .with_context(|| format!("{} has no [distill] table", origin.display()))?;
        let a = parse_table::<DistillLine>(origin, "distill", "distill", table)?.args;
        a.validate()
            .with_context(|| format!("{} [distill]", origin.display()))?;
        Some(a)
    };
    Ok(Recipe { gens, distill })
}
