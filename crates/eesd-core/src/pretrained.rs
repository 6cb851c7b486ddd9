//! Finding a model folder (local path or hub id) and loading everything in it.

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Files fetched for a hub model, besides the weights.
const HUB_FILES: &[&str] = &["config.json", "tokenizer.json"];
const HUB_OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Resolves `--model`: an existing local folder, else a hub id `org/name` looked up in the
/// local HF cache first and downloaded only when online (`HF_HUB_OFFLINE` unset).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.is_dir() {
        if !local.join("config.json").is_file() {
            return Err(Error::ModelNotFound(format!(
                "{spec} (the folder has no config.json)"
            )));
        }
        return Ok(local.to_path_buf());
    }
    if local.is_file() {
        return Err(Error::Input(format!(
            "--model {spec} is a file; give the model folder that holds config.json, the \
             *.safetensors and tokenizer.json (e.g. {})",
            local
                .parent()
                .map_or(".".into(), |d| d.display().to_string())
        )));
    }
    let is_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !is_hub_id {
        return Err(Error::ModelNotFound(spec.to_string()));
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(cfg) = cache.model(spec.to_string()).get("config.json") {
        let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists()
        {
            return Ok(dir);
        }
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    if offline {
        return Err(Error::Hub(format!(
            "{spec} is not a local folder and not in the HF cache ({}), and HF_HUB_OFFLINE is set",
            cache.path().display()
        )));
    }
    download(spec)
}

fn download(spec: &str) -> Result<PathBuf> {
    let hub_err = |e: hf_hub::api::sync::ApiError| Error::Hub(format!("{spec}: {e}"));
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(hub_err)?;
    let repo = api.model(spec.to_string());
    let mut dir = PathBuf::new();
    for f in HUB_FILES {
        dir = repo
            .get(f)
            .map_err(hub_err)?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
    }
    for f in HUB_OPTIONAL {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Hub(e.to_string()))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(s).map_err(hub_err)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(hub_err)?;
        }
    }
    Ok(dir)
}

/// Everything loaded from one model folder.
pub struct Pretrained {
    pub dir: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Checkpoint tensors the model did not use (reported, not fatal).
    pub unused_tensors: Vec<String>,
    /// Identity of the base model, recorded in heads and teacher data.
    pub fingerprint: String,
}

impl Pretrained {
    /// Loads config, weights (converted to `kind` on `device`) and tokenizer from `spec`.
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        let dir = resolve_model_dir(spec)?;
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open_dir(&dir, kind, device)?;
        let fingerprint = crate::fingerprint::fingerprint(&cfg, &weights.shapes()?);
        let model = Llama::load(cfg, &weights)?;
        let mut unused = weights.unused();
        if model.cfg.tie_word_embeddings {
            unused.retain(|n| n != "lm_head.weight");
        }
        let tokenizer = Tokenizer::from_dir(&dir, &model.cfg)?;
        Ok(Pretrained {
            dir,
            model,
            tokenizer,
            unused_tensors: unused,
            fingerprint,
        })
    }
}
