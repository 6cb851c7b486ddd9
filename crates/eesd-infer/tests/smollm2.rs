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
        let g = generate(&p.model, &prompt_ids, &opts, |_| {}).unwrap();
        assert_eq!(g.ids, want, "{id}: greedy ids differ from transformers");
        n += 1;
    }
    assert!(n >= 20, "only {n} reference prompts");
}
