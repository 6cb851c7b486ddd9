//! Rotary position embeddings in the HF "rotate-half" layout.
//!
//! HF LLaMA checkpoints pair dimension i with i + d/2 (not 2i with 2i+1 as tch's own llama
//! example does); only a golden test against transformers tells the two apart.

use crate::config::{LlamaConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

/// Precomputed tables, `[max_positions, head_dim]`, in the model's dtype: `cos` is
/// `[cos θ, cos θ]` and `sin` is `[-sin θ, sin θ]`, the sign of rotate-half folded in, so that
/// the rotation is `x * cos + swap_halves(x) * sin` with no negation at run time.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies `[head_dim / 2]`, with the config's scaling applied as transformers
/// does (`_compute_llama3_parameters`, `_compute_linear_scaling_rope_parameters`).
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None | RopeScaling::Linear { .. } => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, max_positions: usize, kind: Kind, device: Device) -> Self {
        let inv: Vec<f32> = inv_freq(cfg).into_iter().map(|f| f as f32).collect();
        let inv = Tensor::from_slice(&inv);
        let mut pos = Tensor::arange(max_positions as i64, (Kind::Float, Device::Cpu));
        if let RopeScaling::Linear { factor } = cfg.rope_scaling {
            pos /= factor;
        }
        let freqs = pos.unsqueeze(1) * inv.unsqueeze(0); // [P, d/2]
        let (cos, sin) = (freqs.cos(), freqs.sin());
        Rope {
            cos: Tensor::cat(&[&cos, &cos], 1)
                .to_kind(kind)
                .to_device(device),
            sin: Tensor::cat(&[-&sin, sin], 1)
                .to_kind(kind)
                .to_device(device),
        }
    }

    pub fn max_positions(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Cos and sin for `positions` `[B, T]` -> each `[B, 1, T, head_dim]`.
    pub fn tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let (b, t) = positions.size2().expect("positions are [B, T]");
        let flat = positions.reshape([-1]);
        let cos = self.cos.index_select(0, &flat).reshape([b, 1, t, -1]);
        let sin = self.sin.index_select(0, &flat).reshape([b, 1, t, -1]);
        (cos, sin)
    }
}

/// Applies the rotation to `x` `[B, H, T, D]` with tables from [`Rope::tables`].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    x * cos + Tensor::cat(&[x2, x1], 3) * sin
}
