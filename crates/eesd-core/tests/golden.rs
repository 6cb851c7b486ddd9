//! Our forward pass against transformers' on the committed fixtures (scripts/make_golden.py):
//! MHA, GQA with an explicit head_dim and tied embeddings, LLaMA-3 rope scaling (written in
//! the legacy `rope_theta` + `rope_scaling` spelling), each on a batch with a left-padded row.

mod common;
use common::*;

const TOLERANCE: f64 = 1e-4;

#[test]
fn logits_equal_transformers() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let model = load(name);
        let e = expected(name);
        let (b, t) = e.input_ids.size2().unwrap();
        let pad: Vec<i64> = Vec::<i64>::try_from(
            (e.attention_mask.ones_like() - &e.attention_mask)
                .sum_dim_intlist(1, false, tch::Kind::Int64)
                .to_device(tch::Device::Cpu),
        )
        .unwrap();
        let mut cache = model.new_cache(b, t);
        cache.set_left_padding(&pad);
        let logits = model.forward(&e.input_ids, &mut cache);
        assert_eq!(logits.size(), e.logits.size(), "{name}: logits shape");
        for (row, &p) in pad.iter().enumerate() {
            let ours = logits.get(row as i64).narrow(0, p, t - p);
            let theirs = e.logits.get(row as i64).narrow(0, p, t - p);
            let d = max_diff(&ours, &theirs);
            assert!(
                d <= TOLERANCE,
                "{name} row {row}: max |ours - transformers| = {d:e} > {TOLERANCE:e}"
            );
        }
    }
}

#[test]
fn unused_and_missing_tensors_are_reported() {
    use eesd_core::config::LlamaConfig;
    use eesd_core::model::Llama;
    use eesd_core::weights::Weights;
    let dir = fixture("mha_untied");
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let w = Weights::open_dir(&dir, tch::Kind::Float, device()).unwrap();
    Llama::load(cfg.clone(), &w).unwrap();
    assert!(w.unused().is_empty(), "every tensor used: {:?}", w.unused());
    // One layer more than the checkpoint has: the missing tensor is named.
    let mut bigger = cfg.clone();
    bigger.num_layers += 1;
    let err = Llama::load(bigger, &w).err().unwrap().to_string();
    assert!(err.contains("model.layers.2."), "{err}");
    // A wider FFN: the shape error names the tensor and both shapes.
    let mut wider = cfg;
    wider.intermediate_size *= 2;
    let err = Llama::load(wider, &w).err().unwrap().to_string();
    assert!(
        err.contains("gate_proj") && err.contains("[256, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
}
