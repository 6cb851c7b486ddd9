//! The CPU decode path: LLaMA layers run by our own kernels on a few rows at a time.
//!
//! Why it exists (issues 7 and 8): torch's CPU kernels give a row different bits when it is
//! computed with other rows (so speculative verification drifted from plain decoding in bf16),
//! multi-row products cost up to 2x a single row in f32, and per-op dispatch costs milliseconds
//! per token on a small model. Here every per-row result is defined by one fixed order of
//! IEEE operations ([`matmul`], [`simd`]), whatever the number of rows, so verifying k+1
//! positions gives each position exactly the bits of a plain single-token step: EESD is
//! lossless by construction in f32, bf16 and f16. The weights are streamed once per pass for
//! all rows, so verification costs little more than one step.
//!
//! It works on the model's own tensors (no copies): weights are read in place (f32, bf16 or
//! f16, widened in registers), the KV cache is the same [`KvCache`] the torch path fills, and
//! activations are f32. Prompts run here too, in chunks (the same kernels, row tiles).
//! Only batch 1 (one sequence, T rows = T positions) and CPU tensors are handled; CUDA and
//! training keep the torch path.

pub mod aligned;
pub mod matmul;
pub mod pool;
pub mod simd;

use crate::cache::{KvCache, LayerCache};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::head::EarlyExitHead;
use crate::model::{DecoderLayer, Llama, RmsNorm};
use aligned::Aligned;
use matmul::{matmul, Isa, WKind, WeightView};
use pool::{Pool, SendPtr};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

fn wkind(kind: Kind) -> Result<WKind> {
    match kind {
        Kind::Float => Ok(WKind::F32),
        Kind::BFloat16 => Ok(WKind::Bf16),
        Kind::Half => Ok(WKind::F16),
        k => Err(Error::Input(format!(
            "the native CPU path runs f32, bf16 or f16 weights, not {k:?}"
        ))),
    }
}

/// A weight matrix `[n, k]` read in place; holds its tensor so the memory stays alive (and,
/// for bf16 on AMX CPUs, a tile-ordered copy).
pub struct Linear {
    view: WeightView,
    _owner: Tensor,
    _packed: Option<matmul::AmxPacked>,
}

impl Linear {
    pub fn new(t: &Tensor) -> Result<Self> {
        if t.device() != Device::Cpu {
            return Err(Error::Input("the native path needs CPU tensors".into()));
        }
        let (n, k) = t.size2().map_err(Error::from)?;
        let owner = t.detach().contiguous();
        let kind = wkind(owner.kind())?;
        // SAFETY: `owner` is a contiguous CPU tensor of n * k elements of `kind`, kept alive
        // (and never written: the native path only reads weights) as long as this Linear.
        let mut view =
            unsafe { WeightView::new(owner.data_ptr() as *const u8, kind, n as usize, k as usize) };
        let packed = (kind == WKind::Bf16 && Isa::detect() == Isa::Amx && n >= 16)
            .then(|| matmul::AmxPacked::new(&view));
        if let Some(p) = &packed {
            // SAFETY: `p` packs these weights and is owned by this Linear with the view.
            view = unsafe { view.with_packed(p) };
        }
        Ok(Linear {
            view,
            _owner: owner,
            _packed: packed,
        })
    }

    pub fn out_features(&self) -> usize {
        self.view.n
    }

    pub fn in_features(&self) -> usize {
        self.view.k
    }

    /// `y [m, n] = x [m, k] W^T`.
    pub fn forward(&self, ctx: &Ctx, x: &[f32], m: usize, y: &mut [f32]) {
        matmul(ctx.pool, ctx.isa, x, m, &self.view, y);
    }

    /// Row `j` widened to f32 (embedding lookups).
    pub fn row(&self, j: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.view.get(j, i);
        }
    }
}

/// Where the kernels run.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub pool: &'static Pool,
    pub isa: Isa,
}

impl Ctx {
    pub fn detect() -> Self {
        Ctx {
            pool: pool::global(),
            isa: Isa::detect(),
        }
    }
}

fn norm_weights(n: &RmsNorm) -> Vec<f32> {
    Vec::<f32>::try_from(
        n.weight
            .detach()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu),
    )
    .expect("norm weight to host")
}

/// RMSNorm of each row of `x` `[m, h]` into `out`, all in f32 (sum of squares in order).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (row, o) in x.chunks(h).zip(out.chunks_mut(h)) {
        let inv = 1.0 / (sum_squares(row) / h as f32 + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// `sum v * v` as one chain of fused multiply-adds in order. With the FMA instruction
/// inlined where the CPU has it: without, each `mul_add` is a call to libm's `fmaf`, which
/// was 1.5% of a long prompt's prefill on one thread. Same bits either way.
fn sum_squares(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        unsafe fn chain(row: &[f32]) -> f32 {
            row.iter().fold(0.0, |a, v| v.mul_add(*v, a))
        }
        // SAFETY: the CPU has FMA.
        return unsafe { chain(row) };
    }
    row.iter().fold(0.0, |a, v| v.mul_add(*v, a))
}

/// A prompt's rows per thread below which the per-row steps between the products (norms,
/// rotary, residuals, activations) stay on the calling thread: fewer rows are cheaper than
/// the hand-off.
const PAR_MIN_ROWS: usize = 16;

/// `f(rows)` over `0..t` in one contiguous range per thread of the pool (on the calling
/// thread alone for fewer than [`PAR_MIN_ROWS`] rows a thread). Each row's work is the same
/// wherever it runs, so the split changes no bits. On a long prompt these steps left the
/// other thread waiting a fifth of the time when they ran on one.
fn par_rows(ctx: &Ctx, t: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    let threads = ctx.pool.threads();
    if threads == 1 || t < PAR_MIN_ROWS * threads {
        f(0..t);
        return;
    }
    ctx.pool.run(&|tid| {
        let rows = pool::split(t, threads, 1, tid);
        if !rows.is_empty() {
            f(rows);
        }
    });
}

/// Rows `rows` of a row-major `[_, width]` buffer behind `p`.
///
/// # Safety
/// The rows must be inside the buffer and written by no one else meanwhile.
unsafe fn rows_mut<'a>(p: SendPtr, width: usize, rows: &Range<usize>) -> &'a mut [f32] {
    std::slice::from_raw_parts_mut(p.at(rows.start * width), rows.len() * width)
}

/// [`rms_norm`] of every row, rows split over the pool ([`par_rows`]).
fn rms_norm_rows(ctx: &Ctx, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    let op = SendPtr(out.as_mut_ptr());
    par_rows(ctx, x.len() / h, &|rows| {
        // SAFETY: every thread writes its own rows of `out`.
        let o = unsafe { rows_mut(op, h, &rows) };
        rms_norm(&x[rows.start * h..rows.end * h], w, eps, o);
    });
}

/// `x += add` (a residual) over rows of `h`, then, given `(norm weight, eps, out)`, the
/// [`rms_norm`] of each sum into `out`; rows split over the pool.
fn residual_rows(
    ctx: &Ctx,
    x: &mut [f32],
    add: &[f32],
    h: usize,
    norm: Option<(&[f32], f32, &mut [f32])>,
) {
    let xp = SendPtr(x.as_mut_ptr());
    let (w, eps, op) = match norm {
        Some((w, eps, out)) => (w, eps, Some(SendPtr(out.as_mut_ptr()))),
        None => (&[][..], 0.0, None),
    };
    par_rows(ctx, add.len() / h, &|rows| {
        // SAFETY: every thread updates its own rows of `x` (and writes those of `out`).
        let xr = unsafe { rows_mut(xp, h, &rows) };
        for (a, b) in xr.iter_mut().zip(&add[rows.start * h..rows.end * h]) {
            *a += b;
        }
        if let Some(op) = op {
            rms_norm(xr, w, eps, unsafe { rows_mut(op, h, &rows) });
        }
    });
}

/// Rotary tables in f32, `[positions, head_dim / 2]`, computed in f64.
pub struct RopeF32 {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeF32 {
    pub fn new(cfg: &LlamaConfig) -> Self {
        let inv = crate::rope::inv_freq(cfg);
        let half = inv.len();
        let scale = match cfg.rope_scaling {
            RopeScaling::Linear { factor } => 1.0 / factor,
            _ => 1.0,
        };
        let p = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(p * half);
        let mut sin = Vec::with_capacity(p * half);
        for pos in 0..p {
            for f in &inv {
                let a = pos as f64 * scale * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeF32 { cos, sin, half }
    }

    /// Rotates one head vector (rotate-half layout) at `pos` in place.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..][..h], &self.sin[pos * h..][..h]);
        for d in 0..h {
            let (x1, x2) = (x[d], x[d + h]);
            x[d] = x1 * c[d] - x2 * s[d];
            x[d + h] = x2 * c[d] + x1 * s[d];
        }
    }
}

/// One decoder layer over borrowed weights.
pub struct Layer {
    in_norm: Vec<f32>,
    qkv: Linear,
    o: Linear,
    post_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

impl Layer {
    pub fn new(l: &DecoderLayer) -> Result<Self> {
        Ok(Layer {
            in_norm: norm_weights(&l.input_layernorm),
            qkv: Linear::new(&l.self_attn.qkv_proj)?,
            o: Linear::new(&l.self_attn.o_proj)?,
            post_norm: norm_weights(&l.post_attention_layernorm),
            gate_up: Linear::new(&l.mlp.gate_up_proj)?,
            down: Linear::new(&l.mlp.down_proj)?,
        })
    }
}

impl Layer {
    /// The layer's weight matrices in the order a step reads them.
    fn linears(&self) -> [&Linear; 4] {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
    }
}

/// Shapes shared by every layer of a model (and its head).
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
}

impl Dims {
    pub fn of(cfg: &LlamaConfig) -> Self {
        Dims {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
        }
    }
}

/// Raw view of one layer's KV cache: `[kv_heads, capacity, head_dim]` (batch 1).
struct CacheView {
    k: *mut u8,
    v: *mut u8,
    kind: WKind,
    capacity: usize,
}

unsafe impl Send for CacheView {}
unsafe impl Sync for CacheView {}

impl CacheView {
    fn of(c: &mut LayerCache) -> Result<Self> {
        let size = c.k.size();
        if size[0] != 1 || c.k.device() != Device::Cpu || !c.k.is_contiguous() {
            return Err(Error::Input(
                "the native path needs a batch-1 contiguous CPU cache".into(),
            ));
        }
        Ok(CacheView {
            k: c.k.data_ptr() as *mut u8,
            v: c.v.data_ptr() as *mut u8,
            kind: wkind(c.k.kind())?,
            capacity: size[2] as usize,
        })
    }

    fn row(&self, base: *mut u8, g: usize, pos: usize, hd: usize) -> *mut u8 {
        // SAFETY: callers keep g < kv_heads and pos < capacity.
        unsafe { base.add(((g * self.capacity + pos) * hd) * self.kind.bytes()) }
    }
}

/// Causal attention of `t` query rows at positions `offset..offset + t` over the cache's
/// first `offset + t` positions. `q` `[t, heads * hd]` (rotated), out `[t, heads * hd]`.
///
/// A task takes one head and a block of rows (all `t` rows for a verify's few, so it reads
/// each head's keys and values once, not once per row). Each (row, head) result is still one
/// fixed order, whatever `t`: every score is its own dot product by the matmul kernel (a row
/// alone or with others gets the same bits), then max, exponentials and their sum over the
/// row's own `offset + i + 1` positions, then the value rows accumulated in position order
/// ([`simd::weighted_rows`]).
fn attention(
    ctx: &Ctx,
    d: &Dims,
    q: &[f32],
    t: usize,
    offset: usize,
    cv: &CacheView,
    out: &mut [f32],
) {
    let (nh, hd) = (d.heads, d.head_dim);
    let group = nh / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total = offset + t;
    let outp = SendPtr(out.as_mut_ptr());
    // Work units: (head, block of rows). A prompt's rows are cut into blocks so both threads
    // get equal shares when the heads do not divide evenly (9 heads on 2 threads left one
    // idle a ninth of the time), and a block reads only the keys up to its last row. A few
    // decode rows stay one block per head, reading each head's keys once.
    let block = if t >= 2 * ATTN_ROW_BLOCK {
        ATTN_ROW_BLOCK
    } else {
        t
    };
    let blocks = t.div_ceil(block);
    let units = nh * blocks;
    let threads = ctx.pool.threads().min(units);
    let job = |tid: usize| {
        if tid >= threads {
            return;
        }
        let mut qh = Aligned::<f32>::zeroed(block * hd);
        let mut scores = vec![0f32; block * total];
        let mut sums = vec![0f32; block];
        let mut oh = vec![0f32; block * hd];
        for u in pool::split(units, threads, 1, tid) {
            let (h, b) = (u / blocks, u % blocks);
            let g = h / group;
            let rows = b * block..((b + 1) * block).min(t);
            let m = rows.len();
            // Keys up to the block's last row; row i's scores past its own position are
            // computed and ignored (causal mask).
            let seen = offset + rows.end;
            let lens: Vec<usize> = rows.clone().map(|i| offset + i + 1).collect();
            for (j, i) in rows.clone().enumerate() {
                qh[j * hd..][..hd].copy_from_slice(&q[(i * nh + h) * hd..][..hd]);
            }
            // SAFETY: rows 0..seen of kv head g are inside the cache (seen <= total <=
            // capacity) and were written before this call; the view is read-only here.
            let keys = unsafe { WeightView::new(cv.row(cv.k, g, 0, hd), cv.kind, seen, hd) };
            let sc = &mut scores[..m * seen];
            matmul::matmul_single(ctx.isa, &qh[..m * hd], m, &keys, sc);
            for (j, sum) in sums[..m].iter_mut().enumerate() {
                let s = &mut sc[j * seen..][..lens[j]];
                for v in s.iter_mut() {
                    *v *= scale;
                }
                let max = s.iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v));
                *sum = simd::exp_sum(ctx.isa, s, max);
            }
            // SAFETY: value rows 0..seen of kv head g are contiguous and written; `sc` holds
            // m rows of `seen`.
            unsafe {
                let values = simd::ValueRows {
                    ptr: cv.row(cv.v, g, 0, hd),
                    kind: cv.kind,
                    hd,
                };
                simd::weighted_rows(ctx.isa, &mut oh[..m * hd], sc, seen, &lens, &values)
            };
            for (j, i) in rows.enumerate() {
                let inv = 1.0 / sums[j];
                // SAFETY: the unit (head h, these rows) alone writes these [hd] slices.
                let o = unsafe { std::slice::from_raw_parts_mut(outp.at((i * nh + h) * hd), hd) };
                for (o, v) in o.iter_mut().zip(&oh[j * hd..][..hd]) {
                    *o = v * inv;
                }
            }
        }
    };
    if threads <= 1 {
        job(0);
    } else {
        ctx.pool.run(&job);
    }
}

/// Query rows per attention work unit when a pass has many (a prompt chunk).
const ATTN_ROW_BLOCK: usize = 16;

/// A stack of layers and the shapes to run them.
pub struct Stack {
    pub layers: Vec<Layer>,
    pub dims: Dims,
}

impl Stack {
    pub fn new(layers: &[DecoderLayer], cfg: &LlamaConfig) -> Result<Self> {
        Ok(Stack {
            layers: layers.iter().map(Layer::new).collect::<Result<_>>()?,
            dims: Dims::of(cfg),
        })
    }

    /// Runs layers `range` over `x` `[t, hidden]` in place, layer `i` using cache layer `i`
    /// (a head's stack has its own cache, indexed from 0); those cache layers must share one
    /// length and grow by `t`.
    pub fn forward(
        &self,
        ctx: &Ctx,
        rope: &RopeF32,
        x: &mut [f32],
        t: usize,
        range: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<()> {
        self.forward_batch(ctx, rope, x, &mut [Segment { cache, rows: t }], range)
    }

    /// [`Self::forward`] for the rows of several sequences at once: `x` holds each segment's
    /// rows in turn, and segment `s` appends its rows to its own cache at its own length. The
    /// weight products stream every weight once for all rows; attention runs per segment. A
    /// row's bits do not depend on the other segments: every per-row result is one fixed order
    /// of operations, whatever the row count (see the module doc).
    pub fn forward_batch(
        &self,
        ctx: &Ctx,
        rope: &RopeF32,
        x: &mut [f32],
        segs: &mut [Segment],
        range: Range<usize>,
    ) -> Result<()> {
        let cache_start = range.start;
        let d = self.dims;
        let (h, nh, nkv, hd) = (d.hidden, d.heads, d.kv_heads, d.head_dim);
        let t: usize = segs.iter().map(|s| s.rows).sum();
        debug_assert_eq!(x.len(), t * h);
        let qkv_w = (nh + 2 * nkv) * hd;
        // Aligned, so the products read their rows without copies (see [`aligned`]).
        let mut xn = Aligned::<f32>::zeroed(t * h);
        let mut qkv = vec![0f32; t * qkv_w];
        let mut q = vec![0f32; t * nh * hd];
        let mut attn = Aligned::<f32>::zeroed(t * nh * hd);
        let mut proj = vec![0f32; t * h];
        let mut gu = vec![0f32; t * 2 * d.intermediate];
        let mut act = Aligned::<f32>::zeroed(t * d.intermediate);
        let layers = &self.layers[range];
        if let Some(first) = layers.first() {
            rms_norm_rows(ctx, x, &first.in_norm, d.eps, &mut xn);
        }
        for (j, layer) in layers.iter().enumerate() {
            // Attention block: weight products over all rows, attention per segment. `xn`
            // holds this layer's input norm (computed with the residual before it).
            layer.qkv.forward(ctx, &xn, t, &mut qkv);
            let mut first = 0; // the segment's first row
            for seg in segs.iter_mut() {
                let n = seg.rows;
                let lc = &mut seg.cache.layers[cache_start + j];
                let offset = lc.len as usize;
                let cv = CacheView::of(lc)?;
                if offset + n > cv.capacity {
                    return Err(Error::Input(format!(
                        "KV cache overflow: {offset} + {n} > {}",
                        cv.capacity
                    )));
                }
                let (qkv_p, q_p) = (SendPtr(qkv.as_mut_ptr()), SendPtr(q.as_mut_ptr()));
                par_rows(ctx, n, &|rows| {
                    for i in rows {
                        let r = first + i;
                        // SAFETY: every thread takes its own rows of `qkv` and `q`.
                        let row = unsafe { rows_mut(qkv_p, qkv_w, &(r..r + 1)) };
                        for head in 0..nh + nkv {
                            rope.apply(&mut row[head * hd..(head + 1) * hd], offset + i);
                        }
                        unsafe { rows_mut(q_p, nh * hd, &(r..r + 1)) }
                            .copy_from_slice(&row[..nh * hd]);
                        for g in 0..nkv {
                            let k = &row[(nh + g) * hd..][..hd];
                            let v = &row[(nh + nkv + g) * hd..][..hd];
                            // SAFETY: offset + i < capacity (checked above); each position's
                            // rows are written by one thread.
                            unsafe {
                                simd::store(cv.row(cv.k, g, offset + i, hd), cv.kind, k);
                                simd::store(cv.row(cv.v, g, offset + i, hd), cv.kind, v);
                            }
                        }
                    }
                });
                let span = first * nh * hd..(first + n) * nh * hd;
                attention(ctx, &d, &q[span.clone()], n, offset, &cv, &mut attn[span]);
                lc.len = (offset + n) as i64;
                first += n;
            }
            layer.o.forward(ctx, &attn, t, &mut proj);
            // Feed-forward block.
            residual_rows(ctx, x, &proj, h, Some((&layer.post_norm, d.eps, &mut xn)));
            layer.gate_up.forward(ctx, &xn, t, &mut gu);
            let i_sz = d.intermediate;
            let act_p = SendPtr(act.as_mut_ptr());
            par_rows(ctx, t, &|rows| {
                for r in rows {
                    let row = &gu[r * 2 * i_sz..(r + 1) * 2 * i_sz];
                    // SAFETY: every thread writes its own rows of `act`.
                    let out = unsafe { rows_mut(act_p, i_sz, &(r..r + 1)) };
                    simd::silu_mul(ctx.isa, &row[..i_sz], &row[i_sz..], out);
                }
            });
            layer.down.forward(ctx, &act, t, &mut proj);
            // The residual, with the next layer's input norm where there is one.
            let next = layers
                .get(j + 1)
                .map(|l| (&l.in_norm[..], d.eps, &mut xn[..]));
            residual_rows(ctx, x, &proj, h, next);
        }
        Ok(())
    }
}

/// The rows of one sequence in a batched pass: how many, and the cache they extend.
pub struct Segment<'c> {
    pub cache: &'c mut KvCache,
    pub rows: usize,
}

/// Final norm + LM head: `x` `[t, hidden]` -> logits `[t, out]`.
pub struct OutputHead {
    norm: Vec<f32>,
    eps: f32,
    pub lm_head: Linear,
}

impl OutputHead {
    pub fn new(norm: &RmsNorm, lm_head: &Tensor) -> Result<Self> {
        Ok(OutputHead {
            norm: norm_weights(norm),
            eps: norm.eps as f32,
            lm_head: Linear::new(lm_head)?,
        })
    }

    /// The final norm of each row of `x` `[t, hidden]` (what the LM head reads), without the
    /// LM head: the base's final states that a head with the final-state input reads.
    pub fn norm_rows(&self, x: &[f32]) -> Vec<f32> {
        let mut xn = vec![0f32; x.len()];
        rms_norm(x, &self.norm, self.eps, &mut xn);
        xn
    }

    /// Logits of `x` `[t, hidden]` as a `[t, out]` f32 tensor, written in place by the kernel
    /// (no copy of the few MB of logits a verify produces).
    pub fn logits(&self, ctx: &Ctx, x: &[f32], t: usize) -> Tensor {
        self.logits_and_normed(ctx, x, t).0
    }

    /// [`Self::logits`] and the normed rows `[t, hidden]` the LM head read (what a head with
    /// the final-state input reads for the next position).
    pub fn logits_and_normed(&self, ctx: &Ctx, x: &[f32], t: usize) -> (Tensor, Vec<f32>) {
        let mut xn = Aligned::<f32>::zeroed(x.len());
        rms_norm(x, &self.norm, self.eps, &mut xn);
        let v = self.lm_head.out_features();
        let out = Tensor::empty([t as i64, v as i64], (Kind::Float, Device::Cpu));
        // SAFETY: a fresh contiguous f32 CPU tensor of t * v elements, written only here.
        let buf = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, t * v) };
        self.lm_head.forward(ctx, &xn, t, buf);
        (out, xn.to_vec())
    }
}

/// The base model on the native path.
pub struct NativeModel {
    pub ctx: Ctx,
    pub stack: Stack,
    pub rope: RopeF32,
    embed: Linear,
    pub output: OutputHead,
}

impl NativeModel {
    /// Views over `model`'s tensors (which must outlive it; `Llama` is never mutated after
    /// loading). Fails for CUDA models or unsupported dtypes.
    pub fn new(model: &Llama) -> Result<Self> {
        Ok(NativeModel {
            ctx: Ctx::detect(),
            stack: Stack::new(&model.layers, &model.cfg)?,
            rope: RopeF32::new(&model.cfg),
            embed: Linear::new(&model.embed_tokens)?,
            output: OutputHead::new(&model.norm, &model.lm_head)?,
        })
    }

    pub fn hidden(&self) -> usize {
        self.stack.dims.hidden
    }

    /// Token ids -> embeddings `[t, hidden]` in f32.
    pub fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.hidden();
        let mut out = vec![0f32; ids.len() * h];
        for (i, &id) in ids.iter().enumerate() {
            self.embed.row(id as usize, &mut out[i * h..(i + 1) * h]);
        }
        out
    }

    /// Base layers `range` over `x` `[t, hidden]`, using the same cache layers.
    pub fn forward_layers(
        &self,
        x: &mut [f32],
        t: usize,
        range: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<()> {
        self.stack
            .forward(&self.ctx, &self.rope, x, t, range, cache)
    }

    /// [`Self::forward_layers`] over the rows of several sequences at once (see
    /// [`Stack::forward_batch`]).
    pub fn forward_layers_batch(
        &self,
        x: &mut [f32],
        segs: &mut [Segment],
        range: Range<usize>,
    ) -> Result<()> {
        self.stack
            .forward_batch(&self.ctx, &self.rope, x, segs, range)
    }

    /// Final norm + LM head: logits `[t, V]` (f32).
    pub fn logits(&self, x: &[f32], t: usize) -> Tensor {
        self.output.logits(&self.ctx, x, t)
    }

    /// The final states after the norm `[t, hidden]` of `x`, without the LM head.
    pub fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        self.output.norm_rows(x)
    }

    /// [`Self::logits`] and the final states after the norm `[t, hidden]`.
    pub fn logits_and_normed(&self, x: &[f32], t: usize) -> (Tensor, Vec<f32>) {
        self.output.logits_and_normed(&self.ctx, x, t)
    }

    /// Every weight matrix a decode step reads, in step order: each layer's four, then the
    /// LM head (the kernel benchmark times them alone).
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.stack
            .layers
            .iter()
            .flat_map(Layer::linears)
            .chain([&self.output.lm_head])
    }
}

/// An early-exit head on the native path (its layers use the head's own cache).
pub struct NativeHead {
    pub stack: Stack,
    pub output: OutputHead,
    /// The final-state input (norm weights, eps, projection) of a head that has one.
    final_state: Option<(Vec<f32>, f32, Linear)>,
}

impl NativeHead {
    pub fn new(head: &EarlyExitHead, base: &Llama) -> Result<Self> {
        let final_state = match &head.final_state {
            Some(f) => Some((
                norm_weights(&f.norm),
                f.norm.eps as f32,
                Linear::new(&f.proj)?,
            )),
            None => None,
        };
        Ok(NativeHead {
            stack: Stack::new(&head.layers, &base.cfg)?,
            output: OutputHead::new(&head.norm, head.lm_head_weight())?,
            final_state,
        })
    }

    /// Layer-N states `[t, hidden]` (plus, for a head with the final-state input, the base's
    /// final states of the positions before them, `prev` `[t, hidden]`; `None` reads zeros)
    /// through the head. Returns the draft logits `[1, V_d]` of the last row only (the earlier
    /// rows only fill the head's cache) and that row's normed state `[hidden]`.
    pub fn forward_last(
        &self,
        model: &NativeModel,
        x: &mut [f32],
        t: usize,
        prev: Option<&[f32]>,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Vec<f32>)> {
        let mut out =
            self.forward_last_batch(model, x, &mut [Segment { cache, rows: t }], &[prev])?;
        Ok(out.remove(0))
    }

    /// [`Self::forward_last`] for several sequences at once: `x` holds each segment's rows in
    /// turn, `prev[s]` the final states before segment `s`'s rows. Returns each segment's
    /// draft logits `[1, V_d]` and last normed state, every row with the bits it gets alone.
    pub fn forward_last_batch(
        &self,
        model: &NativeModel,
        x: &mut [f32],
        segs: &mut [Segment],
        prev: &[Option<&[f32]>],
    ) -> Result<Vec<(Tensor, Vec<f32>)>> {
        self.layers_batch(model, x, segs, prev)?;
        let h = self.stack.dims.hidden;
        // The last row of each segment, through the norm and the LM head together.
        let mut last = Vec::with_capacity(segs.len() * h);
        let mut end = 0;
        for seg in segs.iter() {
            end += seg.rows;
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let (logits, normed) = self.output.logits_and_normed(&model.ctx, &last, segs.len());
        Ok((0..segs.len())
            .map(|s| {
                (
                    logits.narrow(0, s as i64, 1),
                    normed[s * h..(s + 1) * h].to_vec(),
                )
            })
            .collect())
    }

    /// The head's input (plus the projected final states of `prev`) through its layers,
    /// filling each segment's head cache; `x` ends as the head layers' output.
    pub fn layers_batch(
        &self,
        model: &NativeModel,
        x: &mut [f32],
        segs: &mut [Segment],
        prev: &[Option<&[f32]>],
    ) -> Result<()> {
        let h = self.stack.dims.hidden;
        if let Some((w, eps, proj)) = &self.final_state {
            let mut first = 0;
            for (seg, prev) in segs.iter().zip(prev) {
                let n = seg.rows;
                if let Some(prev) = prev {
                    let mut normed = vec![0f32; n * h];
                    rms_norm(prev, w, *eps, &mut normed);
                    let mut add = vec![0f32; n * h];
                    proj.forward(&model.ctx, &normed, n, &mut add);
                    for (a, b) in x[first * h..(first + n) * h].iter_mut().zip(&add) {
                        *a += b;
                    }
                }
                first += n;
            }
        }
        let layers = self.stack.layers.len();
        self.stack
            .forward_batch(&model.ctx, &model.rope, x, segs, 0..layers)
    }
}

/// Index of the largest value (the first one on ties, as torch's argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Bytes per second that `threads` threads reach reading a buffer far larger than the caches
/// (a plain streaming read, independent of our kernels): the memory floor of decoding.
pub fn stream_read_bandwidth(pool: &Pool, bytes: usize, reps: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let parts = pool.threads();
    let sink = std::sync::atomic::AtomicU64::new(0);
    let pass = || {
        pool.run(&|tid| {
            let r = pool::split(words, parts, 64, tid);
            // Eight independent lanes so the loop vectorises and is not latency-bound.
            let mut acc = [0u64; 8];
            for chunk in buf[r].chunks_exact(8) {
                for (a, v) in acc.iter_mut().zip(chunk) {
                    *a ^= v;
                }
            }
            sink.fetch_xor(
                acc.iter().fold(0, |a, b| a ^ b),
                std::sync::atomic::Ordering::Relaxed,
            );
        })
    };
    pass();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            pass();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
    (words * 8) as f64 / times[times.len() / 2]
}
