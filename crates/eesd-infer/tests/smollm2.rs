//! The real default model (SmolLM2-135M-Instruct, made by `just setup`): chat-formatted prompt
//! ids and 64-token greedy continuations equal transformers' (scripts/reference_greedy.py wrote
//! the committed reference), on 52 prompts from GSM8K, HumanEval, MT-Bench and ShareGPT.

use eesd_core::pretrained::Pretrained;
use eesd_infer::backends::{Kernels, NativeBackend, TorchBackend};
use eesd_infer::controller::{parse, ThompsonConfig};
use eesd_infer::engine::{Engine, GenerateOptions};
use std::path::PathBuf;

fn model_dir() -> PathBuf {
    std::env::var_os("EESD_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/models/smollm2-135m-instruct")
        })
}

#[test]
fn greedy_equals_transformers_on_the_default_model() {
    let dir = model_dir();
    assert!(
        dir.join("config.json").is_file(),
        "the default model is missing at {}: run `just setup` (or set EESD_MODEL_DIR)",
        dir.display()
    );
    let device = match std::env::var("EESD_TEST_DEVICE").as_deref() {
        Ok("cuda") => tch::Device::Cuda(0),
        _ => tch::Device::Cpu,
    };
    let p = Pretrained::load(dir.to_str().unwrap(), device, tch::Kind::Float).unwrap();
    let refs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.jsonl"),
    )
    .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 64,
        sampling: Default::default(),
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    // Native on CPU (the default), torch on CUDA.
    let kernels = Kernels::parse(None, p.model.device).unwrap();
    let mut native = (kernels == Kernels::Native)
        .then(|| Engine::new(NativeBackend::new(&p.model, None).unwrap(), 1));
    let mut torch = Engine::new(TorchBackend::new(&p.model, None, 9), 1);
    let mut n = 0;
    for line in refs.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = r["id"].as_str().unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(r["prompt_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        let prompt_ids = p
            .tokenizer
            .encode_chat(r["prompt"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            prompt_ids, want_prompt,
            "{id}: chat template / tokenizer differ from transformers"
        );
        let got = match native.as_mut() {
            Some(engine) => generate(engine, &prompt_ids, &opts, "off"),
            None => generate(&mut torch, &prompt_ids, &opts, "off"),
        };
        assert_eq!(got, want, "{id}: greedy ids differ from transformers");
        n += 1;
    }
    assert!(n >= 20, "only {n} reference prompts");
}

/// Speculative decoding on the real model: for every controller, with a random head and with
/// the committed trained head, greedy output equals plain decoding (`off`) and transformers' ids
/// (the first `TOKENS` of the 64-token references), on all reference prompts.
#[test]
fn speculative_greedy_equals_transformers_on_the_default_model() {
    use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
    const TOKENS: usize = 12;
    let dir = model_dir();
    assert!(dir.join("config.json").is_file(), "run `just setup` first");
    let p = Pretrained::load(dir.to_str().unwrap(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let trained_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/heads/smollm2-135m-instruct");
    let trained = EarlyExitHead::load(&trained_dir, &p.model, &p.fingerprint).unwrap();
    tch::manual_seed(0);
    let mut spec = HeadSpec::for_base(&p.model, &p.fingerprint, trained.spec.exit_layer);
    spec.init = HeadInit::Random;
    let random = EarlyExitHead::init(&p.model, spec, None).unwrap();
    let refs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.jsonl"),
    )
    .unwrap();
    let cases: Vec<(String, Vec<u32>, Vec<u32>)> = refs
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                serde_json::from_value(r["prompt_ids"].clone()).unwrap(),
                ids.into_iter().take(TOKENS).collect(),
            )
        })
        .collect();
    assert!(cases.len() >= 50, "{} reference prompts", cases.len());
    let opts = GenerateOptions {
        max_new_tokens: TOKENS,
        sampling: Default::default(),
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    for (hname, head) in [("random", &random), ("trained", &trained)] {
        let mut engine = Engine::new(NativeBackend::new(&p.model, Some(head)).unwrap(), 8);
        engine.check_invariants = true;
        engine.calibrate(32, 2).unwrap();
        for name in [
            "off",
            "thompson",
            "thompson-calibrated",
            "fixed:1",
            "fixed:4",
            "heuristic",
            "confidence:0.5",
        ] {
            let mut c = parse(name, &ThompsonConfig::default()).unwrap();
            for (id, prompt, want) in &cases {
                let got = engine.generate(prompt, &opts, c.as_mut(), |_| {}).unwrap();
                assert_eq!(&got.ids, want, "{hname} head, {name}, {id}");
            }
        }
    }
}

/// bf16, the default dtype (issue 7): speculative greedy output equals plain bf16 decoding on
/// every reference prompt, on the native kernels (trained head, several controllers, 24 tokens)
/// and on torch's static-shape path (a subset: it pays the verify width on every plain step).
/// The full 200-prompt run is `just identity`.
#[test]
fn bf16_speculative_equals_plain_bf16_on_the_default_model() {
    use eesd_core::head::EarlyExitHead;
    let dir = model_dir();
    assert!(dir.join("config.json").is_file(), "run `just setup` first");
    let p = Pretrained::load(dir.to_str().unwrap(), tch::Device::Cpu, tch::Kind::BFloat16).unwrap();
    let head_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/heads/smollm2-135m-instruct");
    let head = EarlyExitHead::load(&head_dir, &p.model, &p.fingerprint).unwrap();
    let refs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.jsonl"),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = refs
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(r["prompt_ids"].clone()).unwrap()
        })
        .collect();
    for (kernels, n_prompts, tokens, controllers) in [
        (
            Kernels::Native,
            prompts.len(),
            24,
            &["thompson", "fixed:3", "fixed:8", "confidence:0.5"][..],
        ),
        (Kernels::Torch, 4, 12, &["thompson", "fixed:3"][..]),
    ] {
        let opts = GenerateOptions {
            max_new_tokens: tokens,
            sampling: Default::default(),
            eos_ids: p.tokenizer.eos_ids.clone(),
        };
        let run = |engine: &mut dyn FnMut(&[u32], &str) -> Vec<u32>| {
            for prompt in &prompts[..n_prompts] {
                let want = engine(prompt, "off");
                for name in controllers {
                    assert_eq!(engine(prompt, name), want, "{kernels:?} bf16, {name}");
                }
            }
        };
        match kernels {
            Kernels::Native => {
                let mut e = Engine::new(NativeBackend::new(&p.model, Some(&head)).unwrap(), 8);
                e.check_invariants = true;
                e.calibrate(32, 2).unwrap();
                run(&mut |prompt, name| generate(&mut e, prompt, &opts, name));
            }
            Kernels::Torch => {
                let mut e = Engine::new(TorchBackend::new(&p.model, Some(&head), 9), 8);
                e.check_invariants = true;
                e.calibrate(32, 2).unwrap();
                run(&mut |prompt, name| generate(&mut e, prompt, &opts, name));
            }
        }
    }
}

/// Greedy ids of `prompt` under controller `name` (`off`: plain decoding through the engine).
fn generate<B: eesd_infer::engine::Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    name: &str,
) -> Vec<u32> {
    let mut c = parse(name, &ThompsonConfig::default()).unwrap();
    engine
        .generate(prompt, opts, c.as_mut(), |_| {})
        .unwrap()
        .ids
}
