//! The LLaMA decoder, split so that any range of layers can run on its own.
//!
//! EESD needs the model in pieces: `embed`, then `forward_layers(0..N)` (shared by draft and
//! verify), then `forward_layers(N..L)`, `final_norm`, `logits`. Running `0..L` in one call is
//! plain decoding. All shapes are batch-first: hidden states `[B, T, H]`.

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope::{self, Rope};
use crate::weights::Weights;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// RMSNorm with the variance computed in f32 (as transformers does), output in the input dtype.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&format!("{name}.weight"), &[size as i64])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.weight.size()[0];
        if x.kind() == Kind::Float {
            // One fused kernel; same math as below when nothing needs casting.
            return x.rms_norm([h], Some(&self.weight), self.eps);
        }
        // 16 bits: torch's op normalises in f32 and rounds once, which is transformers'
        // cast-square-mean-scale-cast (bitwise, checked on CPU); the weight then multiplies
        // the rounded result, as in transformers. 2 kernels instead of 8, which counts on a
        // GPU, where a decode step is hundreds of small kernels.
        x.rms_norm([h], None::<&Tensor>, self.eps) * &self.weight
    }
}

/// Self-attention with grouped KV heads and rotary positions.
///
/// q, k and v projections are stored as one `[(nh + 2 nkv) * hd, H]` matrix (rows in that
/// order): at batch 1 decoding is a chain of matrix-vector products, and one larger product
/// reads the same bytes with less per-call overhead than three small ones.
pub struct Attention {
    pub qkv_proj: Tensor,
    pub o_proj: Tensor,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

/// The SwiGLU feed-forward block; gate and up projections fused as `[2 I, H]` (gate rows first),
/// for the same reason as the fused qkv projection.
pub struct Mlp {
    pub gate_up_proj: Tensor,
    pub down_proj: Tensor,
    intermediate: i64,
}

pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    x.linear::<&Tensor>(w, None)
}

impl Attention {
    fn load(w: &Weights, p: &str, cfg: &LlamaConfig) -> Result<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size as i64,
            cfg.num_heads as i64,
            cfg.num_kv_heads as i64,
            cfg.head_dim as i64,
        );
        let q = w.get(&format!("{p}.q_proj.weight"), &[nh * hd, h])?;
        let k = w.get(&format!("{p}.k_proj.weight"), &[nkv * hd, h])?;
        let v = w.get(&format!("{p}.v_proj.weight"), &[nkv * hd, h])?;
        Ok(Attention {
            qkv_proj: Tensor::cat(&[q, k, v], 0),
            o_proj: w.get(&format!("{p}.o_proj.weight"), &[h, nh * hd])?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x` `[B, T, H]` -> `[B, T, H]`, writing T cache entries: at `cache.len` (which grows
    /// by T), or with `slots` (`[T]`, on the device) at those slots over a static-shape cache,
    /// whose length the caller keeps.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut crate::cache::LayerCache,
        slots: Option<&Tensor>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden is [B, T, H]");
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let qkv = linear(x, &self.qkv_proj)
            .view([b, t, nh + 2 * nkv, self.head_dim])
            .transpose(1, 2); // [B, nh + 2 nkv, T, hd]
                              // q and k heads rotate together in one pass.
        let qk = rope::apply(&qkv.narrow(1, 0, nh + nkv), cos, sin);
        let q = qk.narrow(1, 0, nh);
        let k = qk.narrow(1, nh, nkv);
        let v = qkv.narrow(1, nh + nkv, nkv);
        // Write the new entries into the preallocated buffers, then attend over [0, len + T)
        // (or, with static shapes, over every slot, masked).
        if let Some(slots) = slots {
            let _ = cache.k.index_copy_(2, slots, &k);
            let _ = cache.v.index_copy_(2, slots, &v);
        } else {
            let start = cache.len;
            cache.k.narrow(2, start, t).copy_(&k);
            cache.v.narrow(2, start, t).copy_(&v);
            cache.len = start + t;
        }
        let visible = if slots.is_some() {
            cache.k.size()[2]
        } else {
            cache.len
        };
        let keys = cache.k.narrow(2, 0, visible);
        let values = cache.v.narrow(2, 0, visible);
        // An explicit offset-aware mask: `is_causal` is wrong when T differs from the key
        // length (EESD.md section 5). GQA is handled by SDPA itself.
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &keys,
            &values,
            mask,
            0.0,
            false,
            None,
            self.num_kv_heads != self.num_heads,
        ); // [B, nh, T, hd]
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        linear(&out, &self.o_proj)
    }
}

impl Mlp {
    fn load(w: &Weights, p: &str, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let gate = w.get(&format!("{p}.gate_proj.weight"), &[i, h])?;
        let up = w.get(&format!("{p}.up_proj.weight"), &[i, h])?;
        Ok(Mlp {
            gate_up_proj: Tensor::cat(&[gate, up], 0),
            down_proj: w.get(&format!("{p}.down_proj.weight"), &[h, i])?,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let gate_up = linear(x, &self.gate_up_proj);
        let gate = gate_up.narrow(-1, 0, self.intermediate).silu();
        linear(
            &(gate * gate_up.narrow(-1, self.intermediate, self.intermediate)),
            &self.down_proj,
        )
    }
}

impl DecoderLayer {
    /// Loads layer weights stored under prefix `p` (`model.layers.{i}`).
    pub fn load(w: &Weights, p: &str, cfg: &LlamaConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    /// Every weight, by mutable reference (the trainer sets `requires_grad` and updates them).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![
            &mut self.input_layernorm.weight,
            &mut self.self_attn.qkv_proj,
            &mut self.self_attn.o_proj,
            &mut self.post_attention_layernorm.weight,
            &mut self.mlp.gate_up_proj,
            &mut self.mlp.down_proj,
        ]
    }

    /// An independent copy (new storage), e.g. to initialise a head from a base layer.
    pub fn deep_copy(&self) -> Self {
        let c = |t: &Tensor| t.detach().copy();
        DecoderLayer {
            input_layernorm: RmsNorm {
                weight: c(&self.input_layernorm.weight),
                eps: self.input_layernorm.eps,
            },
            self_attn: Attention {
                qkv_proj: c(&self.self_attn.qkv_proj),
                o_proj: c(&self.self_attn.o_proj),
                ..self.self_attn
            },
            post_attention_layernorm: RmsNorm {
                weight: c(&self.post_attention_layernorm.weight),
                eps: self.post_attention_layernorm.eps,
            },
            mlp: Mlp {
                gate_up_proj: c(&self.mlp.gate_up_proj),
                down_proj: c(&self.mlp.down_proj),
                intermediate: self.mlp.intermediate,
            },
        }
    }

    /// Weights under their HF names below `prefix` (`{prefix}.self_attn.q_proj.weight`, ...),
    /// the fused projections split back, so saved layers load like any HF layer.
    pub fn named_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let a = &self.self_attn;
        let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let i = self.mlp.intermediate;
        let part = |t: &Tensor, start: i64, len: i64| t.narrow(0, start, len).contiguous();
        vec![
            (
                format!("{prefix}.input_layernorm.weight"),
                self.input_layernorm.weight.shallow_clone(),
            ),
            (
                format!("{prefix}.self_attn.q_proj.weight"),
                part(&a.qkv_proj, 0, q),
            ),
            (
                format!("{prefix}.self_attn.k_proj.weight"),
                part(&a.qkv_proj, q, kv),
            ),
            (
                format!("{prefix}.self_attn.v_proj.weight"),
                part(&a.qkv_proj, q + kv, kv),
            ),
            (
                format!("{prefix}.self_attn.o_proj.weight"),
                a.o_proj.shallow_clone(),
            ),
            (
                format!("{prefix}.post_attention_layernorm.weight"),
                self.post_attention_layernorm.weight.shallow_clone(),
            ),
            (
                format!("{prefix}.mlp.gate_proj.weight"),
                part(&self.mlp.gate_up_proj, 0, i),
            ),
            (
                format!("{prefix}.mlp.up_proj.weight"),
                part(&self.mlp.gate_up_proj, i, i),
            ),
            (
                format!("{prefix}.mlp.down_proj.weight"),
                self.mlp.down_proj.shallow_clone(),
            ),
        ]
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut crate::cache::LayerCache,
        slots: Option<&Tensor>,
    ) -> Tensor {
        let x = x + self.self_attn.forward(
            &self.input_layernorm.forward(x),
            cos,
            sin,
            mask,
            cache,
            slots,
        );
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// Runs `layers` over `hidden` `[B, T, H]`, layer `j` of the slice using cache layer
/// `cache_range.start + j`. Positions and the mask come from the cache's length and padding.
/// The early-exit head runs its own layers through this too, with its own cache.
pub fn run_stack(
    layers: &[DecoderLayer],
    cache_range: Range<usize>,
    rope: &Rope,
    hidden: &Tensor,
    cache: &mut KvCache,
) -> Tensor {
    if layers.is_empty() {
        return hidden.shallow_clone();
    }
    let t = hidden.size()[1];
    let offset = cache.len(cache_range.start);
    debug_assert!(
        cache_range.clone().all(|i| cache.len(i) == offset),
        "layers of one range must share a cache length"
    );
    if cache.static_shapes() {
        let at = Tensor::from_slice(&[offset]).to_device(hidden.device());
        return run_stack_at(layers, cache_range, rope, hidden, cache, offset, &at);
    }
    assert!(
        offset + t <= cache.capacity(),
        "KV cache overflow: {offset} + {t} > {}",
        cache.capacity()
    );
    let (cos, sin) = rope.tables(&cache.positions(offset, t));
    let mask = cache.mask_if_needed(offset, t);
    let mut x = hidden.shallow_clone();
    for (layer, i) in layers.iter().zip(cache_range) {
        x = layer.forward(&x, &cos, &sin, mask.as_ref(), &mut cache.layers[i], None);
    }
    x
}

/// [`run_stack`] over a static-shape cache with the write offset given twice: `offset_dev`
/// (`[1]` i64 on the device) is what every kernel reads (cache slots, rotary positions, the
/// mask), `offset` only keeps the host-side lengths. No host value reaches a kernel launch, so
/// the pass can be captured once as a CUDA graph and replayed at any later offset after
/// `offset_dev` is refilled in place (issue 9); on every device it computes what `run_stack`
/// computes.
pub fn run_stack_at(
    layers: &[DecoderLayer],
    cache_range: Range<usize>,
    rope: &Rope,
    hidden: &Tensor,
    cache: &mut KvCache,
    offset: i64,
    offset_dev: &Tensor,
) -> Tensor {
    let t = hidden.size()[1];
    assert!(
        offset + t <= cache.capacity(),
        "KV cache overflow: {offset} + {t} > {}",
        cache.capacity()
    );
    let slots = KvCache::slots(offset_dev, t);
    // Padding rows of a verify-width pass may sit past the rotary table near the end of the
    // context; their values are never used, so their positions are clamped into it.
    let positions = cache
        .positions_at(&slots)
        .clamp_max(rope.max_positions() - 1);
    let (cos, sin) = rope.tables(&positions);
    // Additive, in the activations' dtype, once per pass: SDPA would otherwise turn a boolean
    // mask into this very tensor in every layer.
    let allowed = cache.mask_at(&slots);
    let mask = Tensor::zeros(allowed.size(), (hidden.kind(), hidden.device()))
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let mut x = hidden.shallow_clone();
    for (layer, i) in layers.iter().zip(cache_range.clone()) {
        x = layer.forward(
            &x,
            &cos,
            &sin,
            Some(&mask),
            &mut cache.layers[i],
            Some(&slots),
        );
    }
    cache.set_len(cache_range, offset + t);
    x
}

/// A LLaMA causal LM.
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[V, H]`; the embedding matrix itself when embeddings are tied.
    pub lm_head: Tensor,
    pub rope: Rope,
    pub kind: Kind,
    pub device: Device,
}

impl Llama {
    /// Builds the model from HF-named weights. Unused checkpoint tensors are returned so the
    /// caller can report them.
    pub fn load(cfg: LlamaConfig, w: &Weights) -> Result<Self> {
        let (v, h) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(w, &format!("model.layers.{i}"), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        // Some tied checkpoints still carry an lm_head copy; a tied config ignores it.
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            w.get("lm_head.weight", &[v, h])?
        };
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, w.kind, w.device);
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            kind: w.kind,
            device: w.device,
        })
    }

    /// A model of `cfg`'s shape with random weights (std 0.02, norms 1), made directly on the
    /// device: for timing real shapes (LLaMA-2-7B, 13B) where no checkpoint can be carried.
    pub fn random(cfg: LlamaConfig, kind: Kind, device: Device) -> Self {
        let _g = tch::no_grad_guard();
        let (h, i, v) = (
            cfg.hidden_size as i64,
            cfg.intermediate_size as i64,
            cfg.vocab_size as i64,
        );
        let (nh, nkv, hd) = (
            cfg.num_heads as i64,
            cfg.num_kv_heads as i64,
            cfg.head_dim as i64,
        );
        let w = |shape: &[i64]| Tensor::randn(shape, (kind, device)) * 0.02;
        let norm = || RmsNorm {
            weight: Tensor::ones([h], (kind, device)),
            eps: cfg.rms_norm_eps,
        };
        let layers = (0..cfg.num_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(),
                self_attn: Attention {
                    qkv_proj: w(&[(nh + 2 * nkv) * hd, h]),
                    o_proj: w(&[h, nh * hd]),
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(),
                mlp: Mlp {
                    gate_up_proj: w(&[2 * i, h]),
                    down_proj: w(&[h, i]),
                    intermediate: i,
                },
            })
            .collect();
        let embed_tokens = w(&[v, h]);
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            w(&[v, h])
        };
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, kind, device);
        Llama {
            norm: norm(),
            cfg,
            embed_tokens,
            layers,
            lm_head,
            rope,
            kind,
            device,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// A cache sized for this model.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        KvCache::new(&self.cfg, batch, capacity, self.kind, self.device)
    }

    /// Token ids `[B, T]` -> hidden states `[B, T, H]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// Runs layers `range` over `hidden` `[B, T, H]`, appending T positions to each of those
    /// layers' caches. All layers of the range must hold the same cache length.
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        range: Range<usize>,
        cache: &mut KvCache,
    ) -> Tensor {
        run_stack(
            &self.layers[range.clone()],
            range,
            &self.rope,
            hidden,
            cache,
        )
    }

    /// [`Self::forward_layers`] over a static-shape cache at a device offset: see
    /// [`run_stack_at`].
    pub fn forward_layers_at(
        &self,
        hidden: &Tensor,
        range: Range<usize>,
        cache: &mut KvCache,
        offset: i64,
        offset_dev: &Tensor,
    ) -> Tensor {
        run_stack_at(
            &self.layers[range.clone()],
            range,
            &self.rope,
            hidden,
            cache,
            offset,
            offset_dev,
        )
    }

    pub fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.norm.forward(hidden)
    }

    /// Normalised hidden `[B, T, H]` -> logits `[B, T, V]` in f32.
    pub fn logits(&self, normed: &Tensor) -> Tensor {
        linear(normed, &self.lm_head).to_kind(Kind::Float)
    }

    /// The whole model over `ids` `[B, T]`: logits `[B, T, V]` (f32), caches advanced by T.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let h = self.embed(ids);
        let h = self.forward_layers(&h, 0..self.num_layers(), cache);
        self.logits(&self.final_norm(&h))
    }
}
