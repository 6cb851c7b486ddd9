//! The torch backend: decode steps as libtorch ops, on CUDA (with CUDA graphs) or on CPU for
//! comparison. Sequences of a round run one after another (each its own passes).
//!
//! Static shapes: every pass through `[N, L)` runs `static_width` rows (the real ones, then
//! padding), and attention spans the whole cache, so plain steps and verification of up to
//! `width - 1` drafts run identical kernel shapes and a row gets the same bits in either
//! (issue 7: exact on CUDA, whose kernels are chosen by shape).

use super::graphs::{Graphs, Unit};
use super::TorchModel;
use crate::engine::{Backend, Drafted, ModelSpec, Rows};
use crate::verify::Verdict;
use eesd_core::cache::KvCache;
use eesd_core::device::synchronize;
use eesd_core::head::EarlyExitHead;
use eesd_core::model::Llama;
use eesd_core::sampling::SamplingParams;
use eesd_core::{Error, Result};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Hidden states of one sequence: `[1, T, H]`.
#[derive(Debug)]
pub struct TorchRows(pub Tensor);

impl Rows for TorchRows {
    fn rows(&self) -> usize {
        self.0.size()[1] as usize
    }

    fn row(&self, i: usize) -> Self {
        TorchRows(self.0.narrow(1, i as i64, 1))
    }

    fn cat(parts: &[&Self]) -> Self {
        let ts: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
        TorchRows(Tensor::cat(&ts, 1))
    }

    fn share(&self) -> Self {
        TorchRows(self.0.shallow_clone())
    }
}

/// Static-shape caches are sized in multiples of this many positions, so that prompts of
/// similar length share attention shapes (and CUDA graphs).
const CAPACITY_QUANTUM: usize = 256;

/// The base model split at the exit layer, its head, and libtorch ops that run them.
pub struct TorchBackend<'a> {
    torch: TorchModel<'a>,
    /// Rows of every `[N, L)` pass (see the module doc), at least 1.
    static_width: usize,
    /// CUDA graphs of the decode units (on CUDA; eager elsewhere).
    graphs: Graphs,
    /// Caches handed out while graphs are on, by (head?, capacity): a graph writes the buffers
    /// it was recorded with, so they live as long as the backend and serve one generation
    /// after another.
    pool: RefCell<HashMap<(bool, i64), KvCache>>,
    next_pool_id: Cell<u64>,
}

impl<'a> TorchBackend<'a> {
    /// Static shapes of `verify_width` rows (`--max-draft` + 1: plain and speculative runs
    /// compared with each other must use the same width), CUDA graphs where they run
    /// (`EESD_CUDA_GRAPHS=0` turns them off).
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>, verify_width: usize) -> Self {
        let want_graphs = std::env::var("EESD_CUDA_GRAPHS").map_or(true, |v| v != "0");
        TorchBackend {
            torch: TorchModel::new(base, head),
            static_width: verify_width.max(1),
            graphs: Graphs::new(base.device, want_graphs),
            pool: RefCell::new(HashMap::new()),
            next_pool_id: Cell::new(0),
        }
    }

    /// Turns CUDA graphs on or off (they only run on CUDA).
    pub fn with_cuda_graphs(mut self, on: bool) -> Self {
        self.graphs = Graphs::new(self.torch.base.device, on);
        self
    }

    /// Whether decode steps replay CUDA graphs.
    pub fn cuda_graphs(&self) -> bool {
        self.graphs.enabled()
    }

    /// Graph replays so far.
    pub fn graph_replays(&self) -> u64 {
        self.graphs.replays()
    }

    pub fn base(&self) -> &'a Llama {
        self.torch.base
    }

    /// A fresh cache from `make` in this backend's shape mode: a view of a pooled one while
    /// graphs are on.
    fn pooled(&self, is_head: bool, capacity: i64, make: impl FnOnce() -> KvCache) -> KvCache {
        let fresh = || {
            let mut c = make();
            c.set_static_shapes(true);
            c
        };
        if !self.graphs.enabled() {
            return fresh();
        }
        let mut pool = self.pool.borrow_mut();
        pool.entry((is_head, capacity))
            .or_insert_with(|| {
                let mut c = fresh();
                let id = self.next_pool_id.get();
                self.next_pool_id.set(id + 1);
                c.pool_id = Some(id);
                c
            })
            .view()
    }

    /// One token (`[1]` i64) embedded and run through `[0, N)`: its layer-N state.
    pub fn embed_lower(&self, token: &Tensor, cache: &mut KvCache) -> Result<TorchRows> {
        let _g = tch::no_grad_guard();
        let (b, n) = (self.torch.base, self.torch.exit_layer);
        if n == 0 {
            let x = b.embed(&token.view([1, 1]));
            return Ok(TorchRows(b.forward_layers(&x, 0..n, cache)));
        }
        // Static shapes: the token runs as the first of `static_width` rows (the rest
        // padding), as every row of a plain step does through these layers, so layers [0, N)
        // see one kernel shape in plain and speculative decoding alike.
        let offset = cache.len(0);
        let pool = cache.pool_id;
        let pad = Tensor::zeros([self.static_width as i64 - 1], (Kind::Int64, b.device));
        let ids = Tensor::cat(&[&token.view([1]).to_kind(Kind::Int64), &pad], 0);
        let h = self
            .graphs
            .run(Unit::Lower, pool, &ids, offset, |ids, off| {
                b.forward_layers_at(&b.embed(&ids.unsqueeze(0)), 0..n, cache, offset, off)
                    .narrow(1, 0, 1)
            })?;
        cache.set_len(0..n, offset + 1);
        Ok(TorchRows(h))
    }

    /// Layer-N states through `[N, L)`, final norm and LM head: logits `[T, V]` (f32) and the
    /// final states after the norm.
    pub fn upper_one(&self, h: &TorchRows, cache: &mut KvCache) -> Result<(Tensor, TorchRows)> {
        let _g = tch::no_grad_guard();
        let b = self.torch.base;
        let range = self.torch.exit_layer..b.num_layers();
        let t = &h.0;
        let rows = t.size()[1];
        let w = self.static_width as i64;
        if rows > w {
            return Err(Error::Input(format!(
                "verifying {rows} positions but the engine's verify width is {w}"
            )));
        }
        let start = cache.len(range.start);
        let padded = if rows < w {
            let pad = Tensor::zeros([1, w - rows, t.size()[2]], (t.kind(), t.device()));
            Tensor::cat(&[t, &pad], 1)
        } else {
            t.shallow_clone()
        };
        let pool = cache.pool_id;
        // The graph ends at the final norm; the LM head runs after it, on the same shape in
        // plain steps and verification alike.
        let normed = self
            .graphs
            .run(Unit::Upper, pool, &padded, start, |x, off| {
                b.final_norm(&b.forward_layers_at(x, range.clone(), cache, start, off))
            })?;
        let logits = b.logits(&normed).squeeze_dim(0);
        // The padding rows came after the real ones (causal: they changed nothing); drop their
        // cache entries.
        cache.set_len(range, start + rows);
        Ok((
            logits.narrow(0, 0, rows),
            TorchRows(normed.narrow(1, 0, rows)),
        ))
    }

    /// Layer-N states through the head (filling its cache): draft logits of the last row
    /// `[1, V_d]` (f32) and that row's normed head state.
    pub fn head_one(
        &self,
        h: &TorchRows,
        prev: Option<&TorchRows>,
        head_cache: &mut KvCache,
    ) -> Result<(Tensor, TorchRows)> {
        let _g = tch::no_grad_guard();
        let head = self
            .torch
            .head
            .ok_or_else(|| Error::Input("drafting needs a head".into()))?;
        let prev = prev.filter(|_| head.final_state.is_some()).map(|p| &p.0);
        let t = &h.0;
        let input = head.input(t, prev);
        let normed = if head_cache.static_shapes() {
            let start = head_cache.len(0);
            let (rows, e) = (t.size()[1], head.layers.len());
            let pool = head_cache.pool_id;
            let base = self.torch.base;
            let normed = self.graphs.run(Unit::Head, pool, &input, start, |x, off| {
                head.forward_normed_at(base, x, head_cache, start, off)
                    .narrow(1, rows - 1, 1)
            })?;
            head_cache.set_len(0..e, start + rows);
            normed
        } else {
            let hidden = head.forward_hidden(self.torch.base, &input, None, head_cache);
            head.norm
                .forward(&hidden.narrow(1, hidden.size()[1] - 1, 1))
        };
        let logits = head.normed_logits(&normed).squeeze_dim(1);
        Ok((logits, TorchRows(normed)))
    }
}

impl Backend for TorchBackend<'_> {
    type Hidden = TorchRows;
    type Token = Tensor;
    type Logits = Tensor;
    type Probs = Tensor;
    type Cache = KvCache;

    fn spec(&self) -> ModelSpec {
        self.torch.spec()
    }

    fn verify_width(&self) -> Option<usize> {
        Some(self.static_width)
    }

    /// On CUDA each timed round costs two synchronisations.
    fn timing_interval(&self) -> u64 {
        if self.base().device.is_cuda() {
            8
        } else {
            1
        }
    }

    /// Caches sized the same way for plain and speculative decoding (on the static-shape
    /// path the capacity is part of every attention shape), with room for a padded verify.
    fn new_caches(
        &self,
        prompt_len: usize,
        max_new: usize,
        drafting: bool,
    ) -> (KvCache, Option<KvCache>) {
        let b = self.base();
        let ctx = b.cfg.max_position_embeddings;
        let capacity = ctx.min(prompt_len + max_new.max(1)) + 1 + self.static_width;
        let capacity = (capacity.div_ceil(CAPACITY_QUANTUM) * CAPACITY_QUANTUM) as i64;
        let cache = self.pooled(false, capacity, || b.new_cache(1, capacity));
        let head_cache = match (self.torch.head, drafting) {
            (Some(h), true) => Some(self.pooled(true, capacity, || h.new_cache(b, 1, capacity))),
            _ => None,
        };
        (cache, head_cache)
    }

    fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        head_cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, TorchRows)> {
        let (logits, last) = self.torch.prefill(prompt, cache, head_cache);
        Ok((logits, TorchRows(last)))
    }

    fn token(&self, id: u32) -> Tensor {
        Tensor::from_slice(&[id as i64]).to_device(self.base().device)
    }

    fn token_ids(&self, tokens: &[Tensor]) -> Result<Vec<u32>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let ids = Tensor::cat(tokens, 0).to_device(Device::Cpu);
        Ok(Vec::<i64>::try_from(ids)?
            .into_iter()
            .map(|t| t as u32)
            .collect())
    }

    fn lower(&self, tokens: &[&Tensor], caches: &mut [&mut KvCache]) -> Result<Vec<TorchRows>> {
        tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| self.embed_lower(t, c))
            .collect()
    }

    /// Token by token through [`TorchBackend::embed_lower`]: each row then runs the kernel
    /// shape of a plain step's row and gets its bits.
    fn lower_many(
        &self,
        tokens: &[&[&Tensor]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<TorchRows>> {
        tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(ts, c)| {
                let rows = ts
                    .iter()
                    .map(|t| self.embed_lower(t, c))
                    .collect::<Result<Vec<_>>>()?;
                Ok(TorchRows::cat(&rows.iter().collect::<Vec<_>>()))
            })
            .collect()
    }

    fn upper(
        &self,
        states: &[&TorchRows],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<(Tensor, TorchRows)>> {
        states
            .iter()
            .zip(caches.iter_mut())
            .map(|(h, c)| self.upper_one(h, c))
            .collect()
    }

    fn draft(
        &self,
        states: &[&TorchRows],
        prev: &[Option<&TorchRows>],
        head_caches: &mut [&mut KvCache],
    ) -> Result<Vec<(Tensor, TorchRows)>> {
        states
            .iter()
            .zip(prev)
            .zip(head_caches.iter_mut())
            .map(|((h, p), c)| self.head_one(h, *p, c))
            .collect()
    }

    fn first_token(&self, logits: &Tensor, sampling: &SamplingParams) -> Result<u32> {
        self.torch.first_token(logits, sampling)
    }

    fn choose_draft(
        &self,
        logits: &Tensor,
        sampling: &SamplingParams,
        want_confidence: bool,
    ) -> Result<Drafted<Self>> {
        let (token, confidence, q) = self.torch.choose_draft(logits, sampling, want_confidence)?;
        Ok(Drafted {
            token,
            confidence,
            q,
        })
    }

    fn point_mass(&self, token: &Tensor) -> Tensor {
        self.torch.point_mass(token.int64_value(&[0]))
    }

    fn judge(
        &self,
        logits: &Tensor,
        drafts: &[Tensor],
        q: &[Tensor],
        sampling: &SamplingParams,
    ) -> Result<Verdict> {
        let ids = if drafts.is_empty() {
            Tensor::zeros([0], (Kind::Int64, self.base().device))
        } else {
            Tensor::cat(drafts, 0)
        };
        self.torch.judge(logits, &ids, q, sampling)
    }

    fn synchronize(&self) {
        synchronize(self.base().device)
    }
}
