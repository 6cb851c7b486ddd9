//! The model flags both binaries take (`--model`, `--device`, `--dtype`), as one clap struct, so
//! `eesd-infer` and `eesd-train` (and its TOML recipes, whose keys are these flags) agree.

use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::pretrained::Pretrained;
use serde::Serialize;

/// Which model, where, in what precision.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ModelArgs {
    /// A local HF model folder (config.json, *.safetensors, tokenizer.json) or a hub id org/name.
    #[arg(long)]
    pub model: String,
    /// cpu, cuda or cuda:N [default: cuda when available, else cpu]
    #[arg(long)]
    pub device: Option<String>,
    /// f32, f16 or bf16 [default: bf16]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Load even when the checkpoint holds tensors config.json does not use (by default that
    /// is an error: the config and the weights disagree, e.g. on the layer count).
    #[arg(long)]
    pub allow_unused_tensors: bool,
}

impl ModelArgs {
    /// Parses device and dtype and loads the model.
    pub fn load(&self) -> Result<Pretrained> {
        let device = parse_device(self.device.as_deref())?;
        let kind = parse_dtype(self.dtype.as_deref(), device)?;
        let p = Pretrained::load(&self.model, device, kind)?;
        if !p.unused_tensors.is_empty() && !self.allow_unused_tensors {
            let shown: Vec<&str> = p
                .unused_tensors
                .iter()
                .take(3)
                .map(String::as_str)
                .collect();
            return Err(Error::Input(format!(
                "{} holds {} tensors its config.json does not use ({}{}): the config and the \
                 weights disagree (num_hidden_layers is {}); fix the config, or give \
                 --allow-unused-tensors to load anyway",
                p.dir.display(),
                p.unused_tensors.len(),
                shown.join(", "),
                if p.unused_tensors.len() > 3 {
                    ", ..."
                } else {
                    ""
                },
                p.model.cfg.num_layers
            )));
        }
        Ok(p)
    }
}
