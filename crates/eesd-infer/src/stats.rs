//! Per-generation statistics, with the names scripts depend on (`--json` output).

use serde::Serialize;

/// Timing and counts of one generation.
///
/// Decode excludes prefill: the first new token comes out of the prefill pass, so
/// `decode_tokens_per_s` = (new_tokens - 1) / decode_seconds, the rate of the steady
/// token-by-token phase (the vLLM / mistral.rs convention).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecodeStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl DecodeStats {
    pub fn decode_tokens(&self) -> usize {
        self.new_tokens.saturating_sub(1)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_seconds > 0.0 {
            self.decode_tokens() as f64 / self.decode_seconds
        } else {
            0.0
        }
    }

    /// The JSON object of `--json`: the fields plus the derived rate.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("stats serialise");
        v["decode_tokens_per_s"] = self.decode_tokens_per_s().into();
        v
    }
}
