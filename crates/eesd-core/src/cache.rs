//! Preallocated, position-indexed KV cache.
//!
//! Each layer owns `[B, kv_heads, capacity, head_dim]` key and value buffers and its own
//! length, so layers `[0, N)` may run ahead of `[N, L)` while drafting (EESD.md section 2).
//! Rollback after verification is [`KvCache::truncate`]: a length change, no copy.
//!
//! Batches are left-padded: row `b` has `pad[b]` padding slots before its first real token.
//! Those slots are masked out of attention and shift the row's rotary positions.

use crate::config::LlamaConfig;
use tch::{Device, Kind, Tensor};

pub struct LayerCache {
    pub k: Tensor,
    pub v: Tensor,
    pub len: i64,
}

pub struct KvCache {
    pub layers: Vec<LayerCache>,
    capacity: i64,
    /// Left padding per row, `[B]` i64 on the cache's device.
    pad: Tensor,
    pad_host: Vec<i64>,
    /// See [`KvCache::set_static_shapes`].
    static_shapes: bool,
    /// Set on caches whose buffers outlive them (an engine's pool, see [`KvCache::view`]):
    /// only such buffers may be written by a replayed CUDA graph, which holds their addresses.
    pub pool_id: Option<u64>,
}

impl KvCache {
    /// Room for `capacity` positions per row (padding included) in every layer.
    pub fn new(cfg: &LlamaConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        Self::with_layers(cfg, cfg.num_layers, batch, capacity, kind, device)
    }

    /// A cache for `num_layers` layers of the model's shape (the early-exit head's own cache).
    pub fn with_layers(
        cfg: &LlamaConfig,
        num_layers: usize,
        batch: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [
            batch,
            cfg.num_kv_heads as i64,
            capacity,
            cfg.head_dim as i64,
        ];
        let layers = (0..num_layers)
            .map(|_| LayerCache {
                k: Tensor::zeros(shape, (kind, device)),
                v: Tensor::zeros(shape, (kind, device)),
                len: 0,
            })
            .collect();
        KvCache {
            layers,
            capacity,
            pad: Tensor::zeros([batch], (Kind::Int64, device)),
            pad_host: vec![0; batch as usize],
            static_shapes: false,
            pool_id: None,
        }
    }

    /// A cache over the same buffers, emptied (every length 0), with the same shape mode and
    /// padding: how an engine hands out its pooled buffers to one generation after another.
    /// Writes through the view land in this cache's buffers; use one view at a time.
    pub fn view(&self) -> KvCache {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache {
                    k: l.k.shallow_clone(),
                    v: l.v.shallow_clone(),
                    len: 0,
                })
                .collect(),
            capacity: self.capacity,
            pad: self.pad.shallow_clone(),
            pad_host: self.pad_host.clone(),
            static_shapes: self.static_shapes,
            pool_id: self.pool_id,
        }
    }

    /// Sets the length of layers `range` (after a replayed graph wrote them on the device).
    pub fn set_len(&mut self, range: std::ops::Range<usize>, len: i64) {
        assert!(
            len <= self.capacity,
            "KV cache overflow: {len} > {}",
            self.capacity
        );
        for l in &mut self.layers[range] {
            l.len = len;
        }
    }

    pub fn batch(&self) -> i64 {
        self.pad_host.len() as i64
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Declares the left padding of each row; call before the first forward pass.
    pub fn set_left_padding(&mut self, pad: &[i64]) {
        assert_eq!(pad.len() as i64, self.batch(), "one padding count per row");
        self.pad_host = pad.to_vec();
        self.pad = Tensor::from_slice(pad).to_device(self.pad.device());
    }

    pub fn left_padding(&self) -> &[i64] {
        &self.pad_host
    }

    /// Length (padding included) of layer `i`.
    pub fn len(&self, layer: usize) -> i64 {
        self.layers[layer].len
    }

    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| l.len == 0)
    }

    /// Shortens every layer to at most `len` positions: O(1), nothing is copied or zeroed,
    /// the stale entries are overwritten by the next write and masked until then.
    pub fn truncate(&mut self, len: i64) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }

    /// Static attention shapes: every step attends over all `capacity` positions, with a
    /// mask, writing at a device-side offset ([`crate::model::run_stack_at`]). Where a
    /// device's kernels pick different code for different shapes (cuBLAS, flash attention), a
    /// row then gets the same bits whatever step it is computed in, which is what keeps
    /// speculative verification equal to plain decoding on the torch path (issue 7); it is
    /// also the static shape CUDA graphs need.
    pub fn set_static_shapes(&mut self, on: bool) {
        self.static_shapes = on;
    }

    pub fn static_shapes(&self) -> bool {
        self.static_shapes
    }

    /// Positions `offset..offset + t` as a `[T]` tensor on the cache's device.
    fn span(&self, offset: i64, t: i64) -> Tensor {
        Tensor::arange_start(offset, offset + t, (Kind::Int64, self.pad.device()))
    }

    /// Rotary positions of `t` new tokens written at offset `offset`: `[B, T]`.
    pub fn positions(&self, offset: i64, t: i64) -> Tensor {
        self.positions_at(&self.span(offset, t))
    }

    /// The mask for [`Self::mask`], or `None` when it would allow everything: one query and no
    /// padding, the common decode step, where SDPA then takes its unmasked path.
    pub fn mask_if_needed(&self, offset: i64, t: i64) -> Option<Tensor> {
        if t == 1 && self.pad_host.iter().all(|&p| p == 0) {
            None
        } else {
            Some(self.mask(offset, t))
        }
    }

    /// Cache slots `[T]` of `t` new tokens written at the device offset `offset` (`[1]` i64).
    pub fn slots(offset: &Tensor, t: i64) -> Tensor {
        offset + Tensor::arange(t, (Kind::Int64, offset.device()))
    }

    /// Rotary positions `[B, T]` of the tokens at cache `slots` `[T]` (a device tensor).
    pub fn positions_at(&self, slots: &Tensor) -> Tensor {
        (slots.unsqueeze(0) - self.pad.unsqueeze(1)).clamp_min(0)
    }

    /// [`Self::mask`] for queries at cache `slots` `[T]` over every preallocated key, built on
    /// the device from the slots alone: no host value enters it, so a captured graph that
    /// contains it is right at any offset it is replayed at.
    pub fn mask_at(&self, slots: &Tensor) -> Tensor {
        self.mask_for(&slots.unsqueeze(1), self.capacity)
    }

    /// Attention mask for `t` queries at `offset` over `offset + t` keys: `[B, 1, T, S]`, true
    /// where attention is allowed. Causal with the offset (a query sees its own and earlier
    /// positions, never later ones), and padding keys are never seen, except that a padding
    /// query sees itself: a row with no allowed key would give NaN, which would then reach
    /// real rows through `0 * NaN` in the value product.
    pub fn mask(&self, offset: i64, t: i64) -> Tensor {
        self.mask_for(&self.span(offset, t).unsqueeze(1), offset + t)
    }

    /// The mask for query positions `q` `[T, 1]` over the first `s` keys.
    fn mask_for(&self, q: &Tensor, s: i64) -> Tensor {
        let dev = self.pad.device();
        let k = Tensor::arange(s, (Kind::Int64, dev)).unsqueeze(0); // [1, S]
        let causal = k.le_tensor(q); // [T, S]
        let not_pad = k.ge_tensor(&self.pad.unsqueeze(1)); // [B, S]
        let diag = k.eq_tensor(q); // [T, S]
        let allowed = causal.unsqueeze(0).logical_and(&not_pad.unsqueeze(1));
        allowed.logical_or(&diag.unsqueeze(0)).unsqueeze(1)
    }
}
