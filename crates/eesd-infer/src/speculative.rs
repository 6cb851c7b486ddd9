//! Early-exiting speculative decoding: draft with base layers `[0, N)` + the head, verify with
//! layers `[N, L)` over the saved layer-N hidden states, commit, roll back by truncation.
//!
//! Cache invariant (EESD.md section 2): every committed token passes once through `[0, N)`,
//! once through the head and once through `[N, L)`. Between rounds all base layers hold every
//! committed token but the last (the "pending" token, next round's first input); the head cache
//! plus `head_backlog` (layer-N states not yet run through the head, fed to it in one batch at
//! the next draft step) hold the same tokens.

use crate::controller::{Controller, Next, Outcome};
use crate::cost::CostTracker;
use crate::graphs::{Graphs, Unit};
use crate::plain::{check_prompt, GenerateOptions, Generation, StopReason};
use crate::stats::DecodeStats;
use crate::verify::{accept_greedy, accept_sampled, Verdict};
use eesd_core::cache::KvCache;
use eesd_core::device::synchronize;
use eesd_core::head::EarlyExitHead;
use eesd_core::model::Llama;
use eesd_core::native::{NativeHead, NativeModel};
use eesd_core::{Error, Result};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Which kernels run the decode steps (prefill always runs in torch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Our CPU kernels (`eesd_core::native`): a row gets the same bits alone or with others,
    /// so verification equals plain decoding by construction; CPU only.
    Native,
    /// libtorch ops: CUDA, and CPU for comparison.
    Torch,
}

impl Kernels {
    /// `native` or `torch`; `None` picks native on CPU and torch on CUDA.
    pub fn parse(spec: Option<&str>, device: Device) -> Result<Self> {
        match spec {
            None if device == Device::Cpu => Ok(Kernels::Native),
            None | Some("torch") => Ok(Kernels::Torch),
            Some("native") if device == Device::Cpu => Ok(Kernels::Native),
            Some("native") => Err(Error::Input(
                "--kernels native runs on the CPU only; use --kernels torch on CUDA".into(),
            )),
            Some(s) => Err(Error::Input(format!(
                "bad kernels `{s}`: expected native or torch"
            ))),
        }
    }
}

/// Hidden states of one sequence: `[1, T, H]` tensors on the torch path, `[T, H]` f32 rows
/// on the native path.
#[derive(Debug)]
pub enum Hidden {
    Torch(Tensor),
    Native { data: Vec<f32>, rows: usize },
}

impl Hidden {
    pub fn rows(&self) -> usize {
        match self {
            Hidden::Torch(t) => t.size()[1] as usize,
            Hidden::Native { rows, .. } => *rows,
        }
    }

    pub fn share(&self) -> Hidden {
        match self {
            Hidden::Torch(t) => Hidden::Torch(t.shallow_clone()),
            Hidden::Native { data, rows } => Hidden::Native {
                data: data.clone(),
                rows: *rows,
            },
        }
    }

    /// Row `i` alone.
    pub fn row(&self, i: usize) -> Hidden {
        match self {
            Hidden::Torch(t) => Hidden::Torch(t.narrow(1, i as i64, 1)),
            Hidden::Native { data, rows } => {
                let h = data.len() / rows;
                Hidden::Native {
                    data: data[i * h..(i + 1) * h].to_vec(),
                    rows: 1,
                }
            }
        }
    }

    /// Concatenation along positions.
    pub fn cat(parts: &[Hidden]) -> Hidden {
        match parts.first() {
            Some(Hidden::Torch(_)) => {
                let ts: Vec<&Tensor> = parts
                    .iter()
                    .map(|p| match p {
                        Hidden::Torch(t) => t,
                        Hidden::Native { .. } => unreachable!("one engine, one kind"),
                    })
                    .collect();
                Hidden::Torch(Tensor::cat(&ts, 1))
            }
            _ => {
                let mut data = Vec::new();
                let mut rows = 0;
                for p in parts {
                    if let Hidden::Native { data: d, rows: r } = p {
                        data.extend_from_slice(d);
                        rows += r;
                    }
                }
                Hidden::Native { data, rows }
            }
        }
    }
}

/// Restores torch's thread count when dropped (see [`Engine::decode_threads`]).
pub struct TorchThreads(i32);

impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

struct NativeParts {
    model: NativeModel,
    head: Option<NativeHead>,
}

/// The base model split at the exit layer, with its head, and the kernels that run them.
pub struct Engine<'a> {
    pub base: &'a Llama,
    /// `None` decodes plainly (controller `off`) through the same code.
    pub head: Option<&'a EarlyExitHead>,
    /// N; 0 without a head.
    pub exit_layer: usize,
    native: Option<NativeParts>,
    /// Torch path: every pass through `[N, L)` runs this many rows (the real ones, then
    /// padding), and attention spans the whole cache, so plain steps and verification of up
    /// to `width - 1` drafts run identical kernel shapes and a row gets the same bits in
    /// either (issue 7: exact on CUDA, whose kernels are chosen by shape). 0 = off.
    static_width: usize,
    /// CUDA graphs of the decode units (torch path on CUDA; eager elsewhere).
    graphs: Graphs,
    /// Caches handed out by [`Engine::new_cache`] and [`Engine::new_head_cache`] while graphs
    /// are on, by (head?, capacity): a graph writes the buffers it was recorded with, so they
    /// live as long as the engine and serve one generation after another.
    pool: RefCell<HashMap<(bool, i64), KvCache>>,
    next_pool_id: Cell<u64>,
}

/// Static-shape caches are sized in multiples of this many positions, so that prompts of
/// similar length share attention shapes (and CUDA graphs).
const CAPACITY_QUANTUM: usize = 256;

/// Default [`Engine`] verify width: 8 drafts (the CLI's default `--max-draft`) plus one.
pub const DEFAULT_VERIFY_WIDTH: usize = 9;

impl<'a> Engine<'a> {
    /// Native kernels on CPU, torch on CUDA.
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>) -> Self {
        let kernels = Kernels::parse(None, base.device).expect("default kernels");
        Self::with_kernels(base, head, kernels).expect("native views of a CPU model")
    }

    pub fn with_kernels(
        base: &'a Llama,
        head: Option<&'a EarlyExitHead>,
        kernels: Kernels,
    ) -> Result<Self> {
        let exit_layer = head.map(|h| h.spec.exit_layer).unwrap_or(0);
        let native = match kernels {
            Kernels::Torch => None,
            Kernels::Native => Some(NativeParts {
                model: NativeModel::new(base)?,
                head: head.map(|h| NativeHead::new(h, base)).transpose()?,
            }),
        };
        let static_width = if native.is_none() {
            DEFAULT_VERIFY_WIDTH
        } else {
            0
        };
        // On by default where they can run; EESD_CUDA_GRAPHS=0 turns them off.
        let want_graphs =
            static_width > 0 && std::env::var("EESD_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Ok(Engine {
            base,
            head,
            exit_layer,
            native,
            static_width,
            graphs: Graphs::new(base.device, want_graphs),
            pool: RefCell::new(HashMap::new()),
            next_pool_id: Cell::new(0),
        })
    }

    /// Turns CUDA graphs on or off (they only run on the torch path on CUDA).
    pub fn with_cuda_graphs(mut self, on: bool) -> Self {
        self.graphs = Graphs::new(self.base.device, on && self.static_width > 0);
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

    /// The most positions one verification may check (`--max-draft` + 1). On the torch path
    /// every plain step pays for this many rows in `[N, L)` (on a GPU nearly free: the pass is
    /// bound by reading the weights), so plain and speculative engines compared with each
    /// other must use the same width.
    pub fn with_verify_width(mut self, width: usize) -> Self {
        if self.native.is_none() {
            self.static_width = width.max(1);
            self.graphs.clear();
            self.pool.borrow_mut().clear();
        }
        self
    }

    /// The largest verification this engine can run (drafts + 1), if it is bounded.
    pub fn verify_width(&self) -> Option<usize> {
        (self.static_width > 0).then_some(self.static_width)
    }

    /// A base-model cache for a prompt of `prompt_len` tokens and `max_new` new ones, with
    /// room for a padded verification; plain and speculative decoding size it the same way
    /// (on the static-shape path the capacity is part of every attention shape).
    pub fn new_cache(&self, prompt_len: usize, max_new: usize) -> KvCache {
        let ctx = self.base.cfg.max_position_embeddings;
        let mut capacity = ctx.min(prompt_len + max_new.max(1)) + 1 + self.static_width;
        if self.static_width > 0 {
            capacity = capacity.div_ceil(CAPACITY_QUANTUM) * CAPACITY_QUANTUM;
        }
        self.pooled(false, capacity as i64, || {
            self.base.new_cache(1, capacity as i64)
        })
    }

    /// The head's cache for a base cache of `capacity` positions, in the same shape mode.
    pub fn new_head_cache(&self, capacity: i64) -> Option<KvCache> {
        let head = self.head?;
        Some(self.pooled(true, capacity, || head.new_cache(self.base, 1, capacity)))
    }

    /// A fresh cache from `make` in this engine's shape mode: a view of a pooled one while
    /// graphs are on.
    fn pooled(&self, is_head: bool, capacity: i64, make: impl FnOnce() -> KvCache) -> KvCache {
        let fresh = || {
            let mut c = make();
            c.set_static_shapes(self.static_width > 0);
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

    /// For the decode loop: on the native path torch runs single-threaded until the guard
    /// drops. The loop's few torch ops (argmax, sampling) would otherwise wake torch's OpenMP
    /// threads, which then spin on the cores our kernels' threads need.
    pub fn decode_threads(&self) -> TorchThreads {
        let before = tch::get_num_threads();
        if self.native.is_some() {
            tch::set_num_threads(1);
        }
        TorchThreads(before)
    }

    pub fn kernels(&self) -> Kernels {
        if self.native.is_some() {
            Kernels::Native
        } else {
            Kernels::Torch
        }
    }

    /// The prompt through every layer and, given its cache, the head, always in torch (its
    /// GEMMs suit long prompts; decode steps then run on the engine's kernels, so every
    /// position is computed the same way by plain and speculative decoding): the logits of the
    /// last position `[1, V]` and its final state after the norm (one row, what a head with
    /// the final-state input reads for the next position).
    pub fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        head_cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Hidden)> {
        let b = self.base;
        let ids = ids_tensor(prompt, b.device);
        let h_n = b.forward_layers(&b.embed(&ids), 0..self.exit_layer, cache);
        let h = b.forward_layers(&h_n, self.exit_layer..b.num_layers(), cache);
        if let (Some(head), Some(hc)) = (self.head, head_cache) {
            let prev = head
                .final_state
                .as_ref()
                .map(|_| eesd_core::head::previous_positions(&b.final_norm(&h)));
            let _ = head.forward_hidden(b, &h_n, prev.as_ref(), hc);
        }
        // The last row is normed alone, as before the final-state input existed: the first
        // token keeps its bits (a norm over all rows need not give a row the same ones).
        let last = b.final_norm(&h.select(1, -1).unsqueeze(1));
        let logits = b.logits(&last).squeeze_dim(1);
        Ok((logits, self.hidden_of(&last)))
    }

    /// A torch `[1, T, H]` tensor as this engine's kind of hidden states.
    fn hidden_of(&self, t: &Tensor) -> Hidden {
        if self.native.is_none() {
            return Hidden::Torch(t.shallow_clone());
        }
        let rows = t.size()[1] as usize;
        let flat = t.to_kind(Kind::Float).reshape([-1]).to_device(Device::Cpu);
        let data = Vec::<f32>::try_from(flat).expect("f32 rows");
        Hidden::Native { data, rows }
    }

    /// One token (`[1]` i64) embedded and run through `[0, N)`: its layer-N state.
    pub fn embed_lower(&self, token: &Tensor, cache: &mut KvCache) -> Result<Hidden> {
        match &self.native {
            // Static shapes: the token runs as the first of `static_width` rows (the rest
            // padding), as every row of a plain step does through these layers, so layers
            // [0, N) see one kernel shape in plain and speculative decoding alike.
            None if self.static_width > 0 && self.exit_layer > 0 => {
                let (b, n) = (self.base, self.exit_layer);
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
                Ok(Hidden::Torch(h))
            }
            None => {
                let b = self.base;
                Ok(Hidden::Torch(b.forward_layers(
                    &b.embed(&token.view([1, 1])),
                    0..self.exit_layer,
                    cache,
                )))
            }
            Some(n) => {
                let id = token.int64_value(&[0]) as u32;
                let mut data = n.model.embed(&[id]);
                n.model
                    .forward_layers(&mut data, 1, 0..self.exit_layer, cache)?;
                Ok(Hidden::Native { data, rows: 1 })
            }
        }
    }

    /// Layer-N states through `[N, L)`, final norm and LM head: logits `[T, V]` (f32).
    pub fn upper_logits(&self, h: &Hidden, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.upper(h, cache)?.0)
    }

    /// [`Self::upper_logits`] and the final states after the norm (`T` rows), which a head
    /// with the final-state input reads at the next positions.
    pub fn upper(&self, h: &Hidden, cache: &mut KvCache) -> Result<(Tensor, Hidden)> {
        let b = self.base;
        let range = self.exit_layer..b.num_layers();
        match (h, &self.native) {
            (Hidden::Torch(t), None) if self.static_width > 0 => {
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
                // The graph ends at the final norm; the LM head runs after it, on the same
                // shape in plain steps and verification alike.
                let normed = self
                    .graphs
                    .run(Unit::Upper, pool, &padded, start, |x, off| {
                        b.final_norm(&b.forward_layers_at(x, range.clone(), cache, start, off))
                    })?;
                let logits = b.logits(&normed).squeeze_dim(0);
                // The padding rows came after the real ones (causal: they changed nothing);
                // drop their cache entries.
                cache.set_len(range, start + rows);
                Ok((
                    logits.narrow(0, 0, rows),
                    Hidden::Torch(normed.narrow(1, 0, rows)),
                ))
            }
            (Hidden::Torch(t), None) => {
                let normed = b.final_norm(&b.forward_layers(t, range, cache));
                Ok((b.logits(&normed).squeeze_dim(0), Hidden::Torch(normed)))
            }
            (Hidden::Native { data, rows }, Some(n)) => {
                let mut x = data.clone();
                n.model.forward_layers(&mut x, *rows, range, cache)?;
                let (logits, normed) = n.model.logits_and_normed(&x, *rows);
                Ok((
                    logits,
                    Hidden::Native {
                        data: normed,
                        rows: *rows,
                    },
                ))
            }
            _ => Err(Error::Input("hidden states of another engine".into())),
        }
    }

    /// Layer-N states through the head (filling its cache): draft logits of the last row,
    /// `[1, V_d]` (f32), and that row's normed head state. `prev`: the base's final states of
    /// the positions before these rows (same row count), read by a head with the final-state
    /// input (`None`: zeros; ignored by other heads).
    pub fn head_logits(
        &self,
        h: &Hidden,
        prev: Option<&Hidden>,
        head_cache: &mut KvCache,
    ) -> Result<(Tensor, Hidden)> {
        let head = self
            .head
            .ok_or_else(|| Error::Input("drafting needs a head".into()))?;
        let prev = if head.final_state.is_some() {
            prev
        } else {
            None
        };
        match (h, &self.native) {
            (Hidden::Torch(t), None) => {
                let prev = match prev {
                    Some(Hidden::Torch(p)) => Some(p),
                    Some(_) => return Err(Error::Input("hidden states of another engine".into())),
                    None => None,
                };
                let input = head.input(t, prev);
                let normed = if head_cache.static_shapes() {
                    let start = head_cache.len(0);
                    let (rows, e) = (t.size()[1], head.layers.len());
                    let pool = head_cache.pool_id;
                    let normed = self.graphs.run(Unit::Head, pool, &input, start, |x, off| {
                        head.forward_normed_at(self.base, x, head_cache, start, off)
                            .narrow(1, rows - 1, 1)
                    })?;
                    head_cache.set_len(0..e, start + rows);
                    normed
                } else {
                    let hidden = head.forward_hidden(self.base, &input, None, head_cache);
                    head.norm
                        .forward(&hidden.narrow(1, hidden.size()[1] - 1, 1))
                };
                let logits = head.normed_logits(&normed).squeeze_dim(1);
                Ok((logits, Hidden::Torch(normed)))
            }
            (Hidden::Native { data, rows }, Some(n)) => {
                let nh = n.head.as_ref().expect("native head built with the engine");
                let prev = match prev {
                    Some(Hidden::Native { data, .. }) => Some(data.as_slice()),
                    Some(_) => return Err(Error::Input("hidden states of another engine".into())),
                    None => None,
                };
                let mut x = data.clone();
                let (logits, normed) =
                    nh.forward_last(&n.model, &mut x, *rows, prev, head_cache)?;
                Ok((
                    logits,
                    Hidden::Native {
                        data: normed,
                        rows: 1,
                    },
                ))
            }
            _ => Err(Error::Input("hidden states of another engine".into())),
        }
    }
}

/// Per-round options on top of plain generation's.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    pub gen: GenerateOptions,
    /// Measure round timings for the cost model every this many rounds (each such round
    /// synchronises the device twice; on CPU synchronising is free, so use 1 there).
    pub time_every: u64,
    /// Check the cache invariant after every round (on in debug builds and in tests).
    pub check_invariants: bool,
}

/// What plain and speculative generation share before their first decode step.
pub struct Prologue {
    /// The base's cache, holding the prompt.
    pub cache: KvCache,
    /// The head's cache, holding the prompt, when the generation drafts.
    pub head_cache: Option<KvCache>,
    /// Prompt length and prefill time filled in.
    pub stats: DecodeStats,
    /// The first new token, chosen from the prefill's logits: `[1]` i64 on the device.
    pub first: Tensor,
    /// The final state (after the norm) of the prompt's last position, which chose `first`.
    pub last_final: Hidden,
}

impl Engine<'_> {
    /// The one prologue of plain and speculative generation: the prompt checked, the caches
    /// sized the same way (the capacity is part of every attention shape on the static-shape
    /// path, so both must agree), the prompt prefilled (through the head too when `drafting`)
    /// and the first token chosen. `None` when no token is asked for.
    pub fn prologue(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        drafting: bool,
    ) -> Result<Option<Prologue>> {
        check_prompt(self.base, prompt)?;
        if opts.max_new_tokens == 0 {
            return Ok(None);
        }
        let mut cache = self.new_cache(prompt.len(), opts.max_new_tokens);
        let mut head_cache = if drafting {
            self.new_head_cache(cache.capacity())
        } else {
            None
        };
        synchronize(self.base.device);
        let t0 = Instant::now();
        let (logits, last_final) = self.prefill(prompt, &mut cache, head_cache.as_mut())?;
        let first = opts.sampling.select(&logits);
        let stats = DecodeStats {
            prompt_tokens: prompt.len(),
            prefill_seconds: t0.elapsed().as_secs_f64(),
            ..Default::default()
        };
        Ok(Some(Prologue {
            cache,
            head_cache,
            stats,
            first,
            last_final,
        }))
    }
}

fn ids_tensor(ids: &[u32], device: Device) -> Tensor {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&v).to_device(device).unsqueeze(0)
}

/// Generates after `prompt`, with `controller` choosing each round's draft length.
pub fn generate(
    engine: &Engine,
    prompt: &[u32],
    opts: &SpecOptions,
    controller: &mut dyn Controller,
    costs: &mut CostTracker,
    mut on_token: impl FnMut(&[u32]),
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    let base = engine.base;
    let g = &opts.gen;
    let sampling = g.sampling;
    let (device, vocab) = (base.device, base.cfg.vocab_size as i64);
    let ctx = base.cfg.max_position_embeddings;
    let p_len = prompt.len();
    // Prefill: the prompt through every layer and the head.
    let Some(Prologue {
        mut cache,
        mut head_cache,
        mut stats,
        first,
        last_final,
    }) = engine.prologue(prompt, g, true)?
    else {
        return Ok(Generation::empty(p_len));
    };
    let mut ids: Vec<u32> = Vec::with_capacity(g.max_new_tokens);
    let mut pending = first.int64_value(&[0]) as u32;
    let mut head_backlog: Vec<Hidden> = Vec::new();
    // A head with the final-state input reads, with each layer-N state, the base's final state
    // of the position before it: `prev_final` is the one before `pending` (the state whose
    // logits chose it), `backlog_prev` matches `head_backlog` row for row.
    let reads_finals = engine.head.is_some_and(|h| h.final_state.is_some());
    let mut prev_final = last_final;
    let mut backlog_prev: Vec<Hidden> = Vec::new();

    let _threads = engine.decode_threads();
    let t_decode = Instant::now();
    let mut round: u64 = 0;
    let stop = loop {
        ids.push(pending);
        on_token(&ids);
        if g.eos_ids.contains(&pending) {
            break StopReason::Eos;
        }
        if ids.len() >= g.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        if p_len + ids.len() >= ctx {
            break StopReason::ContextFull;
        }
        // Never draft past the token limit or the context.
        let room = (g.max_new_tokens - ids.len()).min(ctx - p_len - ids.len()) - 1;
        let cost_model = costs.costs();
        let planned = if engine.head.is_some() {
            controller.plan(&cost_model).min(room).min(costs.k_max())
        } else {
            0
        };
        let timed = round.is_multiple_of(opts.time_every.max(1));
        let committed_before = cache.len(0); // every committed token but `pending`

        // Draft: each step runs one token through [0, N) and the head (plus any backlog).
        if timed {
            synchronize(device);
        }
        let t_draft = Instant::now();
        let mut lower_states: Vec<Hidden> = Vec::new(); // layer-N states of pending, d1, d2, ...
        let mut drafts: Vec<Tensor> = Vec::new(); // [1] i64 token ids
        let mut q_rows: Vec<Tensor> = Vec::new(); // [1, V] processed draft distributions
        let mut confidences: Vec<f32> = Vec::new();
        let mut input = Tensor::from_slice(&[pending as i64]).to_device(device);
        if let (Some(head), Some(hc)) = (engine.head, head_cache.as_mut()) {
            // The state before the next draft's input: verified for `pending`, the head's own
            // normed output (its stand-in) for the drafts after it.
            let mut before = prev_final.share();
            for i in 1..=planned {
                let h = engine.embed_lower(&input, &mut cache)?;
                head_backlog.push(h.share());
                lower_states.push(h);
                let backlog = Hidden::cat(&head_backlog);
                head_backlog.clear();
                let prev = reads_finals.then(|| {
                    backlog_prev.push(before.share());
                    let p = Hidden::cat(&backlog_prev);
                    backlog_prev.clear();
                    p
                });
                let (draft_logits, normed) = engine.head_logits(&backlog, prev.as_ref(), hc)?; // [1, V_d]
                before = normed;
                let q = (!sampling.is_greedy() || controller.wants_confidence())
                    .then(|| sampling.probs(&draft_logits));
                let idx = match (&q, sampling.is_greedy()) {
                    (Some(q), false) => q.multinomial(1, false).squeeze_dim(1),
                    _ => draft_logits.argmax(-1, false),
                };
                let token = head.token_ids(&idx);
                let mut next = Next::Continue;
                if controller.wants_confidence() {
                    let conf = q
                        .as_ref()
                        .map(|q| q.max().double_value(&[]) as f32)
                        .unwrap_or(1.0);
                    confidences.push(conf);
                    next = controller.after_draft(i, conf, &cost_model);
                    if next == Next::StopDiscard {
                        confidences.pop();
                        break;
                    }
                }
                if !sampling.is_greedy() {
                    q_rows.push(head.to_full_vocab(q.as_ref().expect("q when sampling"), vocab));
                }
                drafts.push(token.shallow_clone());
                input = token;
                if next == Next::Stop {
                    break;
                }
            }
        }
        let k = drafts.len();
        if timed {
            synchronize(device);
        }
        let draft_secs = t_draft.elapsed().as_secs_f64();

        // Verify: the last proposed token (or `pending` when nothing was drafted) still needs
        // [0, N); then [N, L) runs once over the k+1 saved layer-N states.
        let t_verify = Instant::now();
        // A dropped draft (StopDiscard) already ran the last input through [0, N): this
        // verify is cheaper than v(k) measures, and its timing would skew the cost model.
        let full_verify = lower_states.len() == k;
        if full_verify {
            let h = engine.embed_lower(&input, &mut cache)?;
            lower_states.push(h);
        }
        let (logits, finals) = engine.upper(&Hidden::cat(&lower_states), &mut cache)?; // [k+1, V]
        let draft_ids = if k > 0 {
            Tensor::cat(&drafts, 0)
        } else {
            Tensor::zeros([0], (Kind::Int64, device))
        };
        let verdict: Verdict = if sampling.is_greedy() {
            accept_greedy(&logits, &draft_ids)
        } else {
            let p = sampling.probs(&logits);
            let q = if k > 0 {
                Tensor::cat(&q_rows, 0)
            } else {
                Tensor::zeros([0, vocab], (Kind::Float, device))
            };
            let u = Tensor::rand([k as i64], (Kind::Float, device));
            accept_sampled(&p, &q, &draft_ids, &u)
        };
        let verify_secs = t_verify.elapsed().as_secs_f64();
        if timed && full_verify {
            costs.observe_round(k, (k > 0).then(|| draft_secs / k as f64), verify_secs);
        }

        // Commit the accepted drafts and the base's token; roll every cache back to them.
        let a = verdict.accepted;
        let draft_host: Vec<u32> = if a > 0 {
            Vec::<i64>::try_from(draft_ids.narrow(0, 0, a as i64).to_device(Device::Cpu))
                .map_err(Error::from)?
                .into_iter()
                .map(|t| t as u32)
                .collect()
        } else {
            vec![]
        };
        let keep = committed_before + 1 + a as i64; // pending + accepted drafts
        cache.truncate(keep);
        if let Some(hc) = head_cache.as_mut() {
            hc.truncate(keep);
            // Committed tokens that neither the head cache nor the backlog covers yet (the last
            // draft when all were accepted, or `pending` in a round without drafts) join the
            // backlog; the head runs them with its next draft step.
            let backlog_len: i64 = head_backlog.iter().map(|t| t.rows() as i64).sum();
            let covered = (hc.len(0) + backlog_len - committed_before) as usize;
            for (j, h) in lower_states.iter().enumerate().take(1 + a).skip(covered) {
                head_backlog.push(h.share());
                if reads_finals {
                    // Verified now: row j's previous position is `pending`'s predecessor
                    // (j = 0) or verified row j - 1.
                    backlog_prev.push(if j == 0 {
                        prev_final.share()
                    } else {
                        finals.row(j - 1)
                    });
                }
            }
        }
        if reads_finals {
            prev_final = finals.row(a);
        }
        stats.record_round(k, a);
        controller.observe(&Outcome {
            drafted: k,
            accepted: a,
            confidences: &confidences,
        });
        round += 1;
        if opts.check_invariants {
            check_invariant(
                &cache,
                head_cache.as_ref(),
                &head_backlog,
                p_len + ids.len() + a + 1,
            );
        }

        // Emit: accepted drafts (stopping at EOS), then the base's token becomes `pending`.
        let mut eos = false;
        for t in draft_host {
            ids.push(t);
            on_token(&ids);
            if g.eos_ids.contains(&t) {
                eos = true;
                break;
            }
        }
        if eos {
            break StopReason::Eos;
        }
        pending = verdict.next_token;
    };
    synchronize(device);
    stats.decode_seconds = t_decode.elapsed().as_secs_f64();
    stats.new_tokens = ids.len();
    Ok(Generation { ids, stop, stats })
}

/// All base layers hold the committed tokens but the pending one; the head cache plus its
/// backlog hold the same count. `committed` counts prompt and output, pending included.
fn check_invariant(
    cache: &eesd_core::cache::KvCache,
    head_cache: Option<&eesd_core::cache::KvCache>,
    backlog: &[Hidden],
    committed: usize,
) {
    let want = committed as i64 - 1;
    for (i, l) in cache.layers.iter().enumerate() {
        assert_eq!(
            l.len, want,
            "base layer {i} cache holds {} positions, expected {want}",
            l.len
        );
    }
    if let Some(hc) = head_cache {
        let backlog_len: i64 = backlog.iter().map(|t| t.rows() as i64).sum();
        assert_eq!(hc.len(0) + backlog_len, want, "head cache + backlog");
    }
}
