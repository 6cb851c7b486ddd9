//! Shared helpers of the integration tests: the test device and the committed fixtures.
#![allow(dead_code)]

use eesd_core::config::LlamaConfig;
use eesd_core::model::Llama;
use eesd_core::weights::Weights;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// `EESD_TEST_DEVICE=cuda` runs the same tests on a GPU; CPU otherwise.
pub fn device() -> Device {
    match std::env::var("EESD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        Ok(s) if s.starts_with("cuda:") => Device::Cuda(s[5..].parse().expect("cuda:N")),
        _ => Device::Cpu,
    }
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub const CASES: &[&str] = &["mha_untied", "gqa_tied_headdim", "llama3_rope"];

/// A fixture model in f32 on the test device.
pub fn load(name: &str) -> Llama {
    load_on(name, device())
}

/// A fixture model in f32 on `device`.
pub fn load_on(name: &str, device: Device) -> Llama {
    let dir = fixture(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).expect("fixture config");
    let w = Weights::open_dir(&dir, Kind::Float, device).expect("fixture weights");
    Llama::load(cfg, &w).expect("fixture model")
}

/// transformers' recorded inputs and logits for a fixture.
pub struct Expected {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub logits: Tensor,
}

pub fn expected(name: &str) -> Expected {
    let path = fixture(name).join("expected.safetensors");
    let named = Tensor::read_safetensors(&path).expect("expected.safetensors");
    let get = |n: &str| {
        named
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.to_device(device()))
            .unwrap_or_else(|| panic!("{n} missing"))
    };
    Expected {
        input_ids: get("input_ids"),
        attention_mask: get("attention_mask"),
        logits: get("logits"),
    }
}

/// Largest absolute difference.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Deterministic token ids `[B, T]` below `vocab`.
pub fn ids(b: i64, t: i64, vocab: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint_low(3, vocab, [b, t], (Kind::Int64, device()))
}
