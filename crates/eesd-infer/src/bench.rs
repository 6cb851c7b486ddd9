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
    use crate::speculative::Engine;
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
        let engine = Engine::with_kernels(base, None, crate::speculative::Kernels::Torch)
            .expect("torch kernels")
            .with_cuda_graphs(graphs);
        let mut cache = engine.new_cache(context as usize, 2);
        let prompt: Vec<u32> = (0..context as u32)
            .map(|i| (i * 7919) % base.cfg.vocab_size as u32)
            .collect();
        let _ = engine.prefill(&prompt, &mut cache, None).expect("prefill");
        let one = Tensor::from_slice(&[1i64]).to_device(dev);
        median_secs(steps, dev, || {
            let h = engine.embed_lower(&one, &mut cache).expect("step");
            let logits = engine.upper_logits(&h, &mut cache).expect("step");
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
    ) -> (f64, Vec<f64>) {
        let mut spec = HeadSpec::for_base(base, "shape", n);
        spec.init = HeadInit::Random;
        let vocab: Vec<u32> = (0..draft_vocab as u32).collect();
        let head = EarlyExitHead::init(base, spec, (draft_vocab > 0).then_some(vocab.as_slice()))
            .expect("head");
        let engine = Engine::new(base, Some(&head));
        let t = crate::cost::CostTracker::calibrate(&engine, k_max, context, 15);
        let c = t.costs();
        (c.draft_step, c.verify)
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

    /// Seconds of one matrix-vector product over `bytes` of weights in `kind`: the bandwidth
    /// this process reaches on the device.
    pub fn bandwidth(dev: tch::Device, kind: Kind) -> f64 {
        let _g = tch::no_grad_guard();
        let n: i64 = 16384;
        let w = Tensor::randn([n, n], (kind, dev));
        let x = Tensor::randn([n], (kind, dev));
        let secs = median_secs(20, dev, || {
            let _ = w.mv(&x);
        });
        (n * n) as f64 * kind.elt_size_in_bytes() as f64 / secs
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
            let mut one = (0.0, 0.0, 0.0);
            for (&m, t) in rows.iter().zip(times) {
                let [nat, tor, dec] = t.map(median);
                if m == 1 {
                    one = (nat, tor, dec);
                }
                eprintln!(
                    "{kind:?} {m:>2} rows: native {:6.2} ms (x{:.2} of 1 row), torch {:6.2} ms (x{:.2}), \
                     decode pass at {context} {:6.2} ms (x{:.2})",
                    nat * 1e3,
                    nat / one.0.max(1e-12),
                    tor * 1e3,
                    tor / one.1.max(1e-12),
                    dec * 1e3,
                    dec / one.2.max(1e-12),
                );
                per_rows.push(serde_json::json!({
                    "rows": m, "native_ms": nat * 1e3, "torch_ms": tor * 1e3,
                    "decode_pass_ms": dec * 1e3,
                }));
            }
            eprintln!(
                "{kind:?}: floor {floor:.1} tok/s; one native pass = {:.0}% of the floor's time budget",
                100.0 / (one.0 * floor)
            );
            out.push(serde_json::json!({
                "dtype": format!("{kind:?}"), "floor_tokens_per_s": floor, "passes": per_rows,
            }));
        }
        serde_json::json!({
            "stream_read_bytes_per_s": bw, "threads": ctx.pool.threads(),
            "isa": format!("{:?}", ctx.isa), "weight_params_per_token": params,
            "decode_context": context, "dtypes": out,
        })
    }
}
