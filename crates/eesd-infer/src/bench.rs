//! The decode benchmark's measurements that live in Rust: our plain decode rate and the
//! memory-bandwidth floor of this process on this machine.

use crate::stats::median;
use eesd_core::device::synchronize;
use eesd_core::model::Llama;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Bytes per second that a large matrix-vector product reaches through torch here: the same
/// kernel family (GEMV) that dominates batch-1 decoding. The median of `reps` timed runs after
/// a warm-up, over a `[n, n]` matrix of `kind` (f32: n = 8192 reads 268 MB, far beyond cache).
pub fn matvec_bandwidth(device: Device, kind: Kind, n: i64, reps: usize) -> f64 {
    let _g = tch::no_grad_guard();
    let w = Tensor::randn([n, n], (kind, device));
    let x = Tensor::randn([n], (kind, device));
    let bytes = (n * n) as f64 * kind.elt_size_in_bytes() as f64;
    for _ in 0..3 {
        let _ = w.mv(&x);
    }
    synchronize(device);
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let y = w.mv(&x);
            synchronize(device);
            let dt = t.elapsed().as_secs_f64();
            drop(y);
            dt
        })
        .collect();
    bytes / median(times)
}

/// Plain greedy decoding of every prompt after a short warm-up (allocator, kernels, thread
/// pool): (decode tokens, decode seconds), each prompt's rate on stderr.
pub fn plain_decode<B: crate::engine::Backend>(
    engine: &mut crate::engine::Engine<B>,
    prompts: &[Vec<u32>],
    opts: &crate::engine::GenerateOptions,
) -> eesd_core::Result<(usize, f64)> {
    let mut off = crate::controller::Fixed(0);
    if let Some(first) = prompts.first() {
        let warm = crate::engine::GenerateOptions {
            max_new_tokens: 8,
            ..opts.clone()
        };
        engine.generate(first, &warm, &mut off, |_| {})?;
    }
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for (i, ids) in prompts.iter().enumerate() {
        let g = engine.generate(ids, opts, &mut off, |_| {})?;
        tokens += g.stats.decode_tokens();
        seconds += g.stats.decode_seconds;
        eprintln!("[{i}] {:.2} tok/s", g.stats.decode_tokens_per_s());
    }
    Ok((tokens, seconds))
}

/// `eesd-infer bench-decode`'s measurements: our plain decode rate against the floor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeReport {
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    pub decode_tokens_per_s: f64,
    pub bandwidth_bytes_per_s: f64,
    pub weight_bytes_per_token: f64,
    pub floor_tokens_per_s: f64,
    pub fraction_of_floor: f64,
    pub threads: i32,
    pub device: String,
    pub dtype: String,
    pub kernels: String,
}

impl DecodeReport {
    /// The report for `tokens` decoded in `seconds` by `model` on `kernels`, with the floor
    /// measured now ([`decode_floor`]).
    pub fn measure(
        model: &Llama,
        kernels: crate::backends::Kernels,
        prompts: usize,
        max_new_tokens: usize,
        (tokens, seconds): (usize, f64),
    ) -> Self {
        let (bandwidth, bytes) = decode_floor(model);
        let ours = tokens as f64 / seconds;
        let floor = bandwidth / bytes;
        DecodeReport {
            prompts,
            max_new_tokens,
            decode_tokens: tokens,
            decode_seconds: seconds,
            decode_tokens_per_s: ours,
            bandwidth_bytes_per_s: bandwidth,
            weight_bytes_per_token: bytes,
            floor_tokens_per_s: floor,
            fraction_of_floor: ours / floor,
            threads: tch::get_num_threads(),
            device: format!("{:?}", model.device),
            dtype: format!("{:?}", model.kind),
            kernels: format!("{kernels:?}"),
        }
    }
}

/// The floor of plain decoding for `model`: (bytes per second, weight bytes per token). On CPU
/// the bandwidth is a plain streaming read (not any product kernel, whose own speed is what is
/// measured); on CUDA a large matrix-vector product.
pub fn decode_floor(model: &Llama) -> (f64, f64) {
    let bandwidth = if model.device == Device::Cpu {
        let pool = eesd_core::native::pool::global();
        eesd_core::native::stream_read_bandwidth(pool, 1 << 30, 5)
    } else {
        matvec_bandwidth(model.device, model.kind, 8192, 20)
    };
    let bytes = model.cfg.weight_params_per_token() as f64 * model.kind.elt_size_in_bytes() as f64;
    (bandwidth, bytes)
}

/// Every weight product of one decode step, each layer's four and the LM head, over the
/// activations `x_h` (hidden size), `x_o` (attention output) and `x_i` (intermediate size):
/// the pass both the CPU kernel benchmark and the GPU shape benchmark time. The LM head's
/// output is returned (a graph records the pass up to it).
fn weight_products(model: &Llama, x_h: &Tensor, x_o: &Tensor, x_i: &Tensor) -> Tensor {
    for l in &model.layers {
        let _ = x_h.linear::<&Tensor>(&l.self_attn.qkv_proj, None);
        let _ = x_o.linear::<&Tensor>(&l.self_attn.o_proj, None);
        let _ = x_h.linear::<&Tensor>(&l.mlp.gate_up_proj, None);
        let _ = x_i.linear::<&Tensor>(&l.mlp.down_proj, None);
    }
    x_h.linear::<&Tensor>(&model.lm_head, None)
}

/// Median seconds of `reps` calls of `f` on `dev` (synchronised around each), after one
/// untimed call that pays first-touch costs.
fn median_secs(reps: usize, dev: Device, mut f: impl FnMut()) -> f64 {
    f();
    synchronize(dev);
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                synchronize(dev);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Decode costs of a model shape with random weights, measured on `device`: what the
/// controller's cost model sees on a real large model (EESD.md section 6; issue: GPU timings).
pub mod shape {
    use super::median_secs;
    use crate::backends::{Kernels, TorchBackend};
    use crate::engine::Backend;
    use eesd_core::device::synchronize;
    use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
    use eesd_core::model::Llama;
    use tch::{Kind, Tensor};

    /// Plain decode seconds per token after a `context`-token prompt (median over `steps`),
    /// through the decode engine's torch path (the path CUDA runs), with or without CUDA
    /// graphs.
    pub fn plain_step(base: &Llama, context: i64, steps: usize, graphs: bool) -> f64 {
        let _g = tch::no_grad_guard();
        let dev = base.device;
        let engine = TorchBackend::new(base, None, crate::controller::DEFAULT_MAX_DRAFT + 1)
            .with_cuda_graphs(graphs);
        let (mut cache, _) = engine.new_caches(context as usize, 2, false);
        let prompt: Vec<u32> = (0..context as u32)
            .map(|i| (i * 7919) % base.cfg.vocab_size as u32)
            .collect();
        let _ = engine.prefill(&prompt, &mut cache, None).expect("prefill");
        let one = Tensor::from_slice(&[1i64]).to_device(dev);
        median_secs(steps, dev, || {
            let h = engine.embed_lower(&one, &mut cache).expect("step");
            let (logits, _) = engine.upper_one(&h, &mut cache).expect("step");
            let _ = logits.argmax(-1, false).int64_value(&[0]);
            cache.truncate(context);
        })
    }

    /// (c, [v(0..=k_max)]) for exit layer `n` with a one-layer random head and a draft
    /// vocabulary of `draft_vocab` tokens (0 = full), relative to one plain step.
    pub fn spec_costs(
        base: &Llama,
        n: usize,
        draft_vocab: usize,
        k_max: usize,
        context: i64,
    ) -> eesd_core::Result<(f64, Vec<f64>)> {
        let mut spec = HeadSpec::for_base(base, "shape", n);
        spec.init = HeadInit::Random;
        let vocab: Vec<u32> = (0..draft_vocab as u32).collect();
        let head = EarlyExitHead::init(base, spec, (draft_vocab > 0).then_some(vocab.as_slice()))?;
        let kernels = Kernels::parse(None, base.device)?;
        let c = crate::with_engine!(kernels, base, Some(&head), k_max, |engine| {
            engine.calibrate(context as usize, 15)?;
            engine.costs.costs()
        });
        Ok((c.draft_step, c.verify))
    }

    /// Seconds of a step's weight products alone (every layer's four and the LM head) over
    /// `rows` rows, replayed as one CUDA graph where graphs run: the part of a decode step no
    /// fusion of the small kernels around them can remove.
    pub fn weight_pass(base: &Llama, rows: i64, graphs: bool) -> f64 {
        let _g = tch::no_grad_guard();
        let (dev, kind) = (base.device, base.kind);
        let l0 = &base.layers[0];
        let x = |features: i64| Tensor::randn([1, rows, features], (kind, dev)) * 0.1;
        let xh = x(base.cfg.hidden_size as i64);
        let xo = x(l0.self_attn.o_proj.size()[1]);
        let xi = x(l0.mlp.down_proj.size()[1]);
        let pass = || super::weight_products(base, &xh, &xo, &xi);
        if graphs && eesd_core::cuda_graph::available(dev) {
            let _ = pass();
            synchronize(dev);
            let (graph, _out) =
                eesd_core::cuda_graph::CudaGraph::capture(dev, pass).expect("graph capture");
            median_secs(20, dev, || graph.replay().expect("graph replay"))
        } else {
            median_secs(20, dev, || {
                let _ = pass();
            })
        }
    }

    /// The whole shape benchmark (`eesd-infer bench-shape`): plain decode eager and graphed
    /// against the floor, the weight products alone, and c and v(k) per exit layer.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        name: &str,
        cfg: eesd_core::config::LlamaConfig,
        device: tch::Device,
        kind: Kind,
        exits: &[usize],
        draft_vocab: usize,
        max_draft: usize,
        context: i64,
    ) -> eesd_core::Result<serde_json::Value> {
        let bytes = cfg.weight_params_per_token() as f64 * kind.elt_size_in_bytes() as f64;
        eprintln!(
            "{}: {:.2} GB of weights in {kind:?} on {device:?}",
            name,
            bytes / 1e9
        );
        let base = eesd_core::model::Llama::random(cfg, kind, device);
        let bandwidth = super::matvec_bandwidth(device, kind, 16384, 20);
        let floor = bandwidth / bytes;
        let graphs = eesd_core::cuda_graph::available(device);
        // Eager first, then with CUDA graphs where they run (the engine's default there).
        let eager_step = plain_step(&base, context, 30, false);
        let step = if graphs {
            plain_step(&base, context, 30, true)
        } else {
            eager_step
        };
        eprintln!(
            "bandwidth {:.0} GB/s -> floor {floor:.1} tok/s; plain decode eager {:.1} tok/s ({:.0}% of floor){}",
            bandwidth / 1e9,
            1.0 / eager_step,
            100.0 / eager_step / floor,
            if graphs {
                format!(
                    ", CUDA graphs {:.1} tok/s ({:.0}% of floor)",
                    1.0 / step,
                    100.0 / step / floor
                )
            } else {
                String::new()
            }
        );
        // How much of a step the weight products alone take, at one row and at the verify width
        // every step runs (9): what is left is the small kernels around them.
        let width = crate::controller::DEFAULT_MAX_DRAFT as i64 + 1;
        let w1 = weight_pass(&base, 1, graphs);
        let ww = weight_pass(&base, width, graphs);
        eprintln!(
            "weight products alone{}: 1 row {:.2} ms, {width} rows {:.2} ms; whole step {:.2} ms; floor {:.2} ms",
            if graphs { " (one graph)" } else { "" },
            w1 * 1e3,
            ww * 1e3,
            step * 1e3,
            1e3 / floor
        );
        let mut per_exit = Vec::new();
        for &n in exits {
            let (c, v) = spec_costs(&base, n, draft_vocab, max_draft, context)?;
            eprintln!(
                "N = {n}: draft step c = {c:.3}; verify k+1 = 1..{}: {:?}",
                max_draft + 1,
                v.iter()
                    .map(|x| (x * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            );
            per_exit.push(
                serde_json::json!({"exit_layer": n, "draft_step_c": c, "verify_relative": v}),
            );
        }
        let device_name = if device.is_cuda() { "cuda" } else { "cpu" };
        Ok(serde_json::json!({
            "shape": name, "device": device_name, "dtype": format!("{kind:?}"), "context": context,
            "weight_bytes": bytes, "bandwidth_bytes_per_s": bandwidth, "floor_tokens_per_s": floor,
            "plain_tokens_per_s": 1.0 / step, "fraction_of_floor": 1.0 / step / floor,
            "cuda_graphs": graphs, "plain_eager_tokens_per_s": 1.0 / eager_step,
            "weight_products_seconds": {"rows_1": w1, "rows_verify_width": ww, "verify_width": width},
            "draft_vocab": draft_vocab, "exits": per_exit,
        }))
    }
}

/// Kernel-level timings on random weights of a model shape (CPU): the memory floor from a
/// plain streaming read, and one pass of every weight product (all layers + LM head) for
/// 1..16 rows on the native kernels and on torch, per dtype. This is what says whether a
/// verify of k+1 positions costs more than one step (issues 7 and 8).
pub mod kernels {
    use super::median_secs;
    use crate::stats::median;
    use eesd_core::cache::KvCache;
    use eesd_core::config::LlamaConfig;
    use eesd_core::model::Llama;
    use eesd_core::native::{self, Ctx, Linear, NativeModel};
    use tch::{Device, Kind, Tensor};

    /// The native kernels' weight dtype for a torch kind.
    pub fn wkind(kind: Kind) -> native::matmul::WKind {
        match kind {
            Kind::BFloat16 => native::matmul::WKind::Bf16,
            Kind::Half => native::matmul::WKind::F16,
            _ => native::matmul::WKind::F32,
        }
    }

    /// Seconds of one pass of every weight product of `native`'s model over `m` rows.
    pub fn native_pass(native: &NativeModel, m: usize, reps: usize) -> f64 {
        let mats: Vec<&Linear> = native.linears().collect();
        let k_max = mats.iter().map(|l| l.in_features()).max().unwrap_or(0);
        let n_max = mats.iter().map(|l| l.out_features()).max().unwrap_or(0);
        let x: Vec<f32> = (0..m * k_max).map(|i| (i % 17) as f32 * 0.01).collect();
        let mut y = vec![0f32; m * n_max];
        median_secs(reps, Device::Cpu, || {
            for l in &mats {
                let (n, k) = (l.out_features(), l.in_features());
                l.forward(&native.ctx, &x[..m * k], m, &mut y[..m * n]);
            }
        })
    }

    /// Seconds of one whole native decode pass of `m` rows after `context` cached positions:
    /// embeddings, every layer (attention over the cache included) and the LM head, the cache
    /// rolled back after each pass. Against [`native_pass`] this is what a verify of `m`
    /// positions costs beyond its weight products (attention, norms, rotary, activations).
    pub fn decode_pass(
        model: &Llama,
        native: &NativeModel,
        m: usize,
        context: usize,
        reps: usize,
    ) -> f64 {
        let mut cache = KvCache::new(&model.cfg, 1, (context + m) as i64, model.kind, Device::Cpu);
        // Random keys and values, so the scores and exponentials are those of real data.
        for l in &mut cache.layers {
            let _ = l.k.normal_(0.0, 1.0);
            let _ = l.v.normal_(0.0, 1.0);
        }
        let layers = model.cfg.num_layers;
        let ids: Vec<u32> = (0..m as u32).map(|i| 1 + i * 7).collect();
        let pass = || {
            cache.set_len(0..layers, context as i64);
            let mut x = native.embed(&ids);
            native
                .forward_layers(&mut x, m, 0..layers, &mut cache)
                .expect("decode pass");
            let _ = std::hint::black_box(native.logits(&x, m));
        };
        median_secs(reps, Device::Cpu, pass)
    }

    /// The same pass through torch's `linear`.
    pub fn torch_pass(model: &Llama, m: usize, reps: usize) -> f64 {
        let _g = tch::no_grad_guard();
        let h = model.cfg.hidden_size as i64;
        let i = model.cfg.intermediate_size as i64;
        let x_h = Tensor::randn([m as i64, h], (model.kind, Device::Cpu));
        let x_i = Tensor::randn([m as i64, i], (model.kind, Device::Cpu));
        // LLaMA shapes: the attention output has the hidden size, so `x_h` feeds o_proj too.
        let pass = || {
            let _ = super::weight_products(model, &x_h, &x_h, &x_i);
        };
        median_secs(reps, Device::Cpu, pass)
    }

    /// Every measurement for `cfg` as JSON (also printed as a table on stderr).
    pub fn run(
        cfg: &LlamaConfig,
        kinds: &[Kind],
        rows: &[usize],
        context: usize,
        reps: usize,
    ) -> serde_json::Value {
        let ctx = Ctx::detect();
        let bw = native::stream_read_bandwidth(ctx.pool, 1 << 30, 5);
        let params = cfg.weight_params_per_token() as f64;
        eprintln!(
            "streaming read: {:.1} GB/s ({} threads, {:?}); weights per token: {:.0}M",
            bw / 1e9,
            ctx.pool.threads(),
            ctx.isa,
            params / 1e6
        );
        let mut out = Vec::new();
        for &kind in kinds {
            tch::manual_seed(0);
            let model = Llama::random(cfg.clone(), kind, Device::Cpu);
            // Built once per dtype: on AMX CPUs it holds a packed copy of every weight.
            let native = NativeModel::new(&model).expect("cpu weights");
            let floor = bw / (params * kind.elt_size_in_bytes() as f64);
            let peak = native::matmul::peak_multiply_adds(ctx.pool, ctx.isa, wkind(kind));
            // The roofline of a pass of m rows: the weight stream or the rows' arithmetic at
            // the measured peak, whichever is longer.
            let roof = |m: usize| (1.0 / floor).max(m as f64 * params / peak.max(1.0));
            eprintln!(
                "{kind:?}: multiply-add peak {:.1} G/s ({} threads); roofline 1 row {:.2} ms",
                peak / 1e9,
                ctx.pool.threads(),
                roof(1) * 1e3
            );
            let mut per_rows = Vec::new();
            // Interleaved: every row count and contender takes a turn in each round (3 passes,
            // their median), and the rounds' medians are reported, so a ratio between row counts
            // compares passes minutes apart at most, not a drift of the shared machine.
            let rounds = reps.div_ceil(3).max(3);
            let mut times = vec![[Vec::new(), Vec::new(), Vec::new()]; rows.len()];
            for _ in 0..rounds {
                for (&m, t) in rows.iter().zip(times.iter_mut()) {
                    t[0].push(native_pass(&native, m, 3));
                    t[1].push(torch_pass(&model, m, 3));
                    t[2].push(decode_pass(&model, &native, m, context, 3));
                }
            }
            // Each row count's cost relative to one row, per round (the two were measured
            // seconds apart), then the median over rounds: a drift between rounds cancels.
            let first = rows.iter().position(|&m| m == 1);
            let rel = |t: &[Vec<f64>; 3], c: usize| match first {
                Some(f) => median(
                    t[c].iter()
                        .zip(&times[f][c])
                        .map(|(a, b)| a / b.max(1e-12))
                        .collect(),
                ),
                None => f64::NAN,
            };
            let mut one = (0.0, 0.0, 0.0);
            for (&m, t) in rows.iter().zip(times.iter()) {
                let (rn, rt, rd) = (rel(t, 0), rel(t, 1), rel(t, 2));
                let [nat, tor, dec] = t.clone().map(median);
                if m == 1 {
                    one = (nat, tor, dec);
                }
                eprintln!(
                    "{kind:?} {m:>2} rows: native {:6.2} ms (x{rn:.2} of 1 row; roofline x{:.2}, \
                     {:.0}% of it), torch {:6.2} ms (x{rt:.2}), decode pass at {context} {:6.2} ms (x{rd:.2})",
                    nat * 1e3,
                    roof(m) / roof(1),
                    100.0 * roof(m) / nat,
                    tor * 1e3,
                    dec * 1e3,
                );
                per_rows.push(serde_json::json!({
                    "rows": m, "native_ms": nat * 1e3, "torch_ms": tor * 1e3,
                    "roofline_ms": roof(m) * 1e3,
                    "decode_pass_ms": dec * 1e3,
                    "native_x_one_row": rn, "torch_x_one_row": rt, "decode_pass_x_one_row": rd,
                }));
            }
            eprintln!(
                "{kind:?}: floor {floor:.1} tok/s; one native pass = {:.0}% of the floor's time budget",
                100.0 / (one.0 * floor)
            );
            out.push(serde_json::json!({
                "dtype": format!("{kind:?}"), "floor_tokens_per_s": floor, "passes": per_rows,
                "peak_multiply_adds_per_s": peak,
            }));
        }
        serde_json::json!({
            "stream_read_bytes_per_s": bw, "threads": ctx.pool.threads(),
            "isa": format!("{:?}", ctx.isa), "weight_params_per_token": params,
            "decode_context": context, "dtypes": out,
        })
    }
}
