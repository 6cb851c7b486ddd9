//! A head folder whose head.json is arbitrary bytes, next to valid weights: loading it must
//! give a head or an error, never a panic (the fuzzer seeds from a real head.json).
#![no_main]
use eesd_core::config::LlamaConfig;
use eesd_core::head::{EarlyExitHead, HeadSpec};
use eesd_core::model::Llama;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

struct Fixture {
    base: Llama,
    dir: PathBuf,
}

thread_local! {
    static FIXTURE: Fixture = {
        let mut cfg = LlamaConfig::named_shape("smollm2-135m").unwrap();
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) = (32, 64, 4);
        (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) = (4, 2, 8, 64);
        let base = Llama::random(cfg, tch::Kind::Float, tch::Device::Cpu);
        let mut spec = HeadSpec::for_base(&base, "fp", 2);
        spec.head_layers = 2;
        spec.final_state_input = true;
        let vocab: Vec<u32> = (0..16).collect();
        let head = EarlyExitHead::init(&base, spec, Some(&vocab)).unwrap();
        let dir = std::env::temp_dir().join(format!("eesd-fuzz-head-{}", std::process::id()));
        head.save(&dir).unwrap();
        Fixture { base, dir }
    };
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|f| {
        std::fs::write(f.dir.join("head.json"), data).unwrap();
        let _ = EarlyExitHead::load(&f.dir, &f.base, "fp");
    });
});
