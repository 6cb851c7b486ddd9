//! The model flags both binaries take (`--model`, `--device`, `--dtype`), as one clap struct, so
//! `eesd-infer` and `eesd-train` (and its TOML recipes, whose keys are these flags) agree.

use crate::device::{parse_device, parse_dtype};
use crate::error::Result;
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
}

impl ModelArgs {
    /// Parses device and dtype and loads the model.
    pub fn load(&self) -> Result<Pretrained> {
        let device = parse_device(self.device.as_deref())?;
        let kind = parse_dtype(self.dtype.as_deref(), device)?;
        Pretrained::load(&self.model, device, kind)
    }
}
