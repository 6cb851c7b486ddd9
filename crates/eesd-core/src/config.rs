//! HF `config.json` of a LLaMA-family model, parsed as written and resolved into a runtime
//! [`LlamaConfig`] with no optional fields left.
//!
//! Accepts LLaMA-2 (MHA and GQA), LLaMA-3/3.1 (`rope_scaling` of type `llama3`), SmolLM2 (tied
//! embeddings), and both spellings of the rope settings: `rope_theta` + `rope_scaling` (real
//! LLaMA folders) and `rope_parameters` (what current transformers writes).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The raw file, every field as HF may write it.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
}

/// How rotary frequencies are scaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// LLaMA-3.1: low frequencies divided by `factor`, high kept, a smooth band between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The resolved configuration the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn unsupported(field: &str, found: impl std::fmt::Display, expected: &str) -> Error {
    Error::Unsupported {
        field: field.to_string(),
        found: found.to_string(),
        expected: expected.to_string(),
    }
}

/// Token ids may be written as one integer, a list, or null.
fn token_ids(field: &str, v: &Option<serde_json::Value>) -> Result<Vec<u32>> {
    let as_id = |x: &serde_json::Value| {
        x.as_u64()
            .map(|n| n as u32)
            .ok_or_else(|| unsupported(field, x, "expected a token id or a list of ids"))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn num(obj: &serde_json::Value, key: &str, field: &str) -> Result<f64> {
    obj.get(key)
        .and_then(|v| v.as_f64())
        .ok_or_else(|| unsupported(&format!("{field}.{key}"), "missing", "a number is required"))
}

fn parse_scaling(v: &serde_json::Value, field: &str) -> Result<RopeScaling> {
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num(v, "factor", field)?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num(v, "factor", field)?,
            low_freq_factor: num(v, "low_freq_factor", field)?,
            high_freq_factor: num(v, "high_freq_factor", field)?,
            original_max_position_embeddings: num(v, "original_max_position_embeddings", field)?,
        }),
        other => Err(unsupported(
            &format!("{field}.rope_type"),
            other,
            "supported: default, linear, llama3",
        )),
    }
}

impl HfConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Checks the architecture and fills every default the way transformers does.
    pub fn resolve(&self) -> Result<LlamaConfig> {
        let is_llama = self.model_type.as_deref() == Some("llama")
            || self
                .architectures
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x == "LlamaForCausalLM"));
        if !is_llama {
            let found = self.model_type.clone().unwrap_or_else(|| "missing".into());
            return Err(unsupported(
                "model_type",
                found,
                "only \"llama\" (LlamaForCausalLM) is supported",
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(unsupported("hidden_act", act, "LLaMA uses \"silu\""));
            }
        }
        if self.attention_bias == Some(true) {
            return Err(unsupported(
                "attention_bias",
                true,
                "biased attention projections are not supported",
            ));
        }
        if self.mlp_bias == Some(true) {
            return Err(unsupported(
                "mlp_bias",
                true,
                "biased MLP projections are not supported",
            ));
        }
        let num_heads = self.num_attention_heads;
        let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(unsupported(
                "num_key_value_heads",
                num_kv_heads,
                &format!("must divide num_attention_heads ({num_heads})"),
            ));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / num_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(unsupported(
                "head_dim",
                head_dim,
                "must be even and non-zero",
            ));
        }
        // `rope_parameters` (new transformers) carries both theta and the scaling type.
        let (rope_theta, rope_scaling) = match (&self.rope_parameters, self.rope_theta) {
            (Some(p), _) if p.is_object() => {
                let theta = p
                    .get("rope_theta")
                    .and_then(|t| t.as_f64())
                    .or(self.rope_theta);
                (
                    theta.unwrap_or(10000.0),
                    parse_scaling(p, "rope_parameters")?,
                )
            }
            _ => {
                let scaling = match &self.rope_scaling {
                    Some(v) => parse_scaling(v, "rope_scaling")?,
                    None => RopeScaling::None,
                };
                (self.rope_theta.unwrap_or(10000.0), scaling)
            }
        };
        let eos_token_ids = token_ids("eos_token_id", &self.eos_token_id)?;
        let bos_token_id = token_ids("bos_token_id", &self.bos_token_id)?
            .first()
            .copied();
        Ok(LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        })
    }
}

impl LlamaConfig {
    /// Published shapes, for timing with random weights: `llama2-7b`, `llama2-13b`,
    /// `llama2-70b`, `smollm2-135m`.
    pub fn named_shape(name: &str) -> Option<Self> {
        let (h, i, l, nh, nkv, v, ctx, theta, tied) = match name {
            "llama2-7b" => (4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, false),
            "llama2-13b" => (5120, 13824, 40, 40, 40, 32000, 4096, 10000.0, false),
            "llama2-70b" => (8192, 28672, 80, 64, 8, 32000, 4096, 10000.0, false),
            "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, 8192, 100000.0, true),
            _ => return None,
        };
        Some(LlamaConfig {
            hidden_size: h,
            intermediate_size: i,
            num_layers: l,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: h / nh,
            vocab_size: v,
            rms_norm_eps: 1e-5,
            max_position_embeddings: ctx,
            rope_theta: theta,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        })
    }

    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        HfConfig::from_file(path)?.resolve().map_err(|e| match e {
            Error::Unsupported { .. } => Error::Config {
                path: path.to_path_buf(),
                msg: e.to_string(),
            },
            e => e,
        })
    }

    /// Parameters read per decoded token (all weights; the embedding row gather is negligible
    /// but a tied embedding is still read once as the LM head).
    pub fn weight_params_per_token(&self) -> usize {
        let h = self.hidden_size;
        let attn =
            h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2;
        let mlp = 3 * h * self.intermediate_size;
        self.num_layers * (attn + mlp + 2 * h) + h + self.vocab_size * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        })
    }

    fn resolve(v: serde_json::Value) -> Result<LlamaConfig> {
        serde_json::from_value::<HfConfig>(v).unwrap().resolve()
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = resolve(base()).unwrap();
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn rope_parameters_and_rope_theta_spellings_agree() {
        let mut a = base();
        a["rope_theta"] = 100000.0.into();
        let mut b = base();
        b["rope_parameters"] = serde_json::json!({"rope_theta": 100000.0, "rope_type": "default"});
        assert_eq!(resolve(a).unwrap(), resolve(b).unwrap());
    }

    #[test]
    fn llama3_scaling_in_both_spellings() {
        let s = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut a = base();
        a["rope_scaling"] = s.clone();
        a["rope_theta"] = 500000.0.into();
        let mut b = base();
        let mut p = s;
        p["rope_theta"] = 500000.0.into();
        b["rope_parameters"] = p;
        let (a, b) = (resolve(a).unwrap(), resolve(b).unwrap());
        assert_eq!(a, b);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn eos_as_list_or_int() {
        let mut a = base();
        a["eos_token_id"] = serde_json::json!([128001, 128008, 128009]);
        assert_eq!(
            resolve(a).unwrap().eos_token_ids,
            vec![128001, 128008, 128009]
        );
        let mut b = base();
        b["eos_token_id"] = 2.into();
        assert_eq!(resolve(b).unwrap().eos_token_ids, vec![2]);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut a = base();
        a["model_type"] = "mistral".into();
        assert!(resolve(a).unwrap_err().to_string().contains("model_type"));
        let mut b = base();
        b["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(resolve(b)
            .unwrap_err()
            .to_string()
            .contains("rope_scaling.rope_type"));
        let mut c = base();
        c["num_key_value_heads"] = 3.into();
        assert!(resolve(c)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        let mut d = base();
        d["hidden_act"] = "gelu".into();
        assert!(resolve(d).unwrap_err().to_string().contains("hidden_act"));
    }
}
