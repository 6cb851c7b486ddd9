//! The real default model (SmolLM2-135M-Instruct, made by `just setup`): chat-formatted prompt
//! ids and 64-token greedy continuations equal transformers' (scripts/reference_greedy.py wrote
//! the committed reference), on 52 prompts from GSM8K, HumanEval, MT-Bench and ShareGPT.

use eesd_core::pretrained::Pretrained;
use eesd_infer::plain::{generate, GenerateOptions};
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
    let engine = eesd_infer::speculative::Engine::new(&p.model, None);
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
        let g = generate(&engine, &prompt_ids, &opts, |_| {}).unwrap();
        assert_eq!(g.ids, want, "{id}: greedy ids differ from transformers");
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
    use eesd_infer::controller::{parse, ThompsonConfig};
    use eesd_infer::cost::CostTracker;
    use eesd_infer::speculative::{generate as spec_generate, Engine, SpecOptions};
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
    let opts = SpecOptions {
        gen: GenerateOptions {
            max_new_tokens: TOKENS,
            sampling: Default::default(),
            eos_ids: p.tokenizer.eos_ids.clone(),
        },
        time_every: 1,
        check_invariants: true,
    };
    for (hname, head) in [("random", &random), ("trained", &trained)] {
        let engine = Engine::new(&p.model, Some(head));
        let mut costs = CostTracker::calibrate(&engine, 8, 32, 2);
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
                let got =
                    spec_generate(&engine, prompt, &opts, c.as_mut(), &mut costs, |_| {}).unwrap();
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
    use eesd_infer::controller::{parse, ThompsonConfig};
    use eesd_infer::cost::CostTracker;
    use eesd_infer::speculative::{generate as spec_generate, Engine, Kernels, SpecOptions};
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
        let opts = SpecOptions {
            gen: GenerateOptions {
                max_new_tokens: tokens,
                sampling: Default::default(),
                eos_ids: p.tokenizer.eos_ids.clone(),
            },
            time_every: 1,
            check_invariants: true,
        };
        let engine = Engine::with_kernels(&p.model, Some(&head), kernels)
            .unwrap()
            .with_verify_width(9);
        let mut costs = CostTracker::calibrate(&engine, 8, 32, 2);
        for prompt in &prompts[..n_prompts] {
            let want = generate(&engine, prompt, &opts.gen, |_| {}).unwrap().ids;
            for name in controllers {
                let mut c = parse(name, &ThompsonConfig::default()).unwrap();
                let got =
                    spec_generate(&engine, prompt, &opts, c.as_mut(), &mut costs, |_| {}).unwrap();
                assert_eq!(got.ids, want, "{kernels:?} bf16, {name}");
            }
        }
    }
}
