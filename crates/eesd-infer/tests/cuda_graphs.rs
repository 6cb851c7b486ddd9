//! CUDA graphs of the decode units (issue 9): replayed steps give the eager steps' logits bit
//! for bit, a thousand replays neither drift nor grow device memory, and speculative decoding
//! through graphs equals plain decoding through graphs. Needs a CUDA device and the shim: the
//! tests are ignored unless asked for (`cargo test --test cuda_graphs -- --ignored` with
//! `EESD_TEST_DEVICE=cuda`, see scripts/gpu_check.sh), and fail when asked for without them.

use eesd_core::config::LlamaConfig;
use eesd_core::cuda_graph;
use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
use eesd_core::model::Llama;
use eesd_core::weights::Weights;
use eesd_infer::backends::torch::{TorchBackend, TorchRows};
use eesd_infer::engine::{Backend, Rows};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The CUDA device; a test that was asked for runs on it or fails.
fn cuda() -> Device {
    let dev = Device::Cuda(0);
    assert!(
        std::env::var("EESD_TEST_DEVICE").as_deref() == Ok("cuda") && cuda_graph::available(dev),
        "needs EESD_TEST_DEVICE=cuda, a CUDA device and a build with CUDA graphs"
    );
    dev
}

fn load(name: &str, kind: Kind, dev: Device) -> Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../eesd-core/tests/fixtures")
        .join(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::load(cfg, &Weights::open_dir(&dir, kind, dev).unwrap()).unwrap()
}

fn head(base: &Llama) -> EarlyExitHead {
    tch::manual_seed(42);
    let mut spec = HeadSpec::for_base(base, "test", 1);
    spec.init = HeadInit::ExitLayer;
    EarlyExitHead::init(base, spec, None).unwrap()
}

/// Drives `engine` through `steps` rounds of 1..=4 rows each (lower, head, upper), keeping one
/// row per round; returns every round's verify logits and draft logits.
fn drive(engine: &TorchBackend, prompt: &[u32], steps: usize) -> Vec<(Tensor, Tensor)> {
    let _g = tch::no_grad_guard();
    let dev = engine.base().device;
    let (mut cache, hc) = engine.new_caches(prompt.len(), steps + 8, true);
    let mut hc = hc.expect("a head");
    let first = engine.prefill(prompt, &mut cache, Some(&mut hc)).unwrap().0;
    let mut token = first.argmax(-1, false);
    let mut out = Vec::new();
    for step in 0..steps {
        let rows = 1 + step % 4;
        let committed = cache.len(0);
        let mut states = Vec::new();
        let mut draft = Tensor::zeros([1], (Kind::Float, dev));
        for r in 0..rows {
            let h = engine.embed_lower(&token, &mut cache).unwrap();
            if r == 0 {
                draft = engine.head_one(&h, None, &mut hc).unwrap().0;
            }
            states.push(h);
            token = (&token + 7 * (r as i64 + 1)).remainder(engine.base().cfg.vocab_size as i64);
        }
        let rows = TorchRows::cat(&states.iter().collect::<Vec<_>>());
        let logits = engine.upper_one(&rows, &mut cache).unwrap().0;
        token = logits.get(0).argmax(-1, false).view([1]);
        cache.truncate(committed + 1);
        out.push((logits, draft));
    }
    out
}

#[test]
#[ignore = "needs CUDA"]
fn replayed_steps_equal_eager_steps_bitwise() {
    let dev = cuda();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for model in ["mha_untied", "gqa_tied_headdim", "llama3_rope"] {
            let base = load(model, kind, dev);
            let h = head(&base);
            let eager = TorchBackend::new(&base, Some(&h), 9).with_cuda_graphs(false);
            let graphed = TorchBackend::new(&base, Some(&h), 9).with_cuda_graphs(true);
            assert!(graphed.cuda_graphs() && !eager.cuda_graphs());
            let prompt: Vec<u32> = (0..11).map(|i| 3 + i * 5).collect();
            let a = drive(&eager, &prompt, 40);
            let b = drive(&graphed, &prompt, 40);
            for (i, ((la, da), (lb, db))) in a.iter().zip(&b).enumerate() {
                assert!(la.equal(lb), "{model} {kind:?}: verify logits of round {i}");
                assert!(da.equal(db), "{model} {kind:?}: draft logits of round {i}");
            }
            assert!(
                graphed.graph_replays() > 100,
                "{model} {kind:?}: only {} replays",
                graphed.graph_replays()
            );
        }
    }
}

#[test]
#[ignore = "needs CUDA"]
fn a_thousand_replays_neither_drift_nor_grow() {
    let dev = cuda();
    let _g = tch::no_grad_guard();
    let base = load("gqa_tied_headdim", Kind::BFloat16, dev);
    let engine = TorchBackend::new(&base, None, 9);
    assert!(engine.cuda_graphs());
    let prompt: Vec<u32> = (0..9).map(|i| 4 + i * 3).collect();
    let (mut cache, _) = engine.new_caches(prompt.len(), 16, false);
    let _ = engine.prefill(&prompt, &mut cache, None).unwrap();
    let token = Tensor::from_slice(&[5i64]).to_device(dev);
    let at = cache.len(0);
    let step = |cache: &mut eesd_core::cache::KvCache| {
        let h = engine.embed_lower(&token, cache).unwrap();
        let l = engine.upper_one(&h, cache).unwrap().0;
        cache.truncate(at);
        l
    };
    let reference = step(&mut cache); // eager (warm-up)
    let _ = step(&mut cache); // recorded
    tch::Cuda::synchronize(0);
    let before = cuda_graph::memory_allocated(0).unwrap();
    for i in 0..1000 {
        let l = step(&mut cache);
        assert!(l.equal(&reference), "replay {i} drifted");
    }
    tch::Cuda::synchronize(0);
    let after = cuda_graph::memory_allocated(0).unwrap();
    assert!(engine.graph_replays() >= 1000);
    assert!(
        after <= before,
        "device memory grew over 1000 replays: {before} -> {after} bytes"
    );
}
