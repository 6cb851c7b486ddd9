//! Prefill on the native kernels: the cache, the head's cache and the first token's logits
//! are the same bits however the prompt is cut into chunks, and close to torch's prefill.

use eesd_core::cache::KvCache;
use eesd_core::config::LlamaConfig;
use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
use eesd_core::model::Llama;
use eesd_core::weights::Weights;
use eesd_infer::backends::{NativeBackend, TorchBackend};
use eesd_infer::engine::Backend;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn load_as(name: &str, kind: Kind) -> Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../eesd-core/tests/fixtures")
        .join(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::load(cfg, &Weights::open_dir(&dir, kind, Device::Cpu).unwrap()).unwrap()
}

/// A head at exit layer 1 reading the previous position's final state (projection random, so
/// it reads something), which is the input that crosses chunk boundaries.
fn final_state_head(base: &Llama) -> EarlyExitHead {
    tch::manual_seed(43);
    let mut spec = HeadSpec::for_base(base, "test", 1);
    spec.init = HeadInit::Random;
    spec.final_state_input = true;
    let mut h = EarlyExitHead::init(base, spec, None).unwrap();
    let f = h.final_state.as_mut().unwrap();
    f.proj = f.proj.randn_like() * 0.5;
    h
}

fn prompt(base: &Llama, len: usize) -> Vec<u32> {
    tch::manual_seed(11);
    let t = Tensor::randint_low(
        3,
        base.cfg.vocab_size as i64,
        [len as i64],
        (Kind::Int64, Device::Cpu),
    );
    Vec::<i64>::try_from(t)
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Every written position of every layer of `cache`, as one f32 tensor per layer.
fn filled(cache: &KvCache) -> Vec<(Tensor, Tensor)> {
    cache
        .layers
        .iter()
        .map(|l| {
            (
                l.k.narrow(2, 0, l.len).to_kind(Kind::Float),
                l.v.narrow(2, 0, l.len).to_kind(Kind::Float),
            )
        })
        .collect()
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.view_dtype(Kind::Int).equal(&b.view_dtype(Kind::Int))
}

type Prefilled = (
    Tensor,
    Vec<f32>,
    Vec<(Tensor, Tensor)>,
    Option<Vec<(Tensor, Tensor)>>,
);

fn prefill(backend: &NativeBackend, prompt: &[u32], drafting: bool) -> Prefilled {
    let (mut cache, mut head_cache) = backend.new_caches(prompt.len(), 4, drafting);
    let (logits, last) = backend
        .prefill(prompt, &mut cache, head_cache.as_mut())
        .unwrap();
    (
        logits,
        last.data,
        filled(&cache),
        head_cache.as_ref().map(filled),
    )
}

#[test]
fn chunking_does_not_change_a_bit() {
    for model in ["mha_untied", "gqa_tied_headdim", "llama3_rope"] {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let base = load_as(model, kind);
            let head = final_state_head(&base);
            let ids = prompt(&base, 100);
            for drafting in [false, true] {
                let mut backend = NativeBackend::new(&base, drafting.then_some(&head)).unwrap();
                backend.prefill_chunk = 512;
                let (logits, last, cache, head_cache) = prefill(&backend, &ids, drafting);
                assert_eq!(cache[0].0.size()[2], 100);
                assert_eq!(head_cache.is_some(), drafting);
                for chunk in [1, 7, 64] {
                    backend.prefill_chunk = chunk;
                    let (l2, last2, c2, h2) = prefill(&backend, &ids, drafting);
                    let what = format!("{model} {kind:?} drafting={drafting} chunk {chunk}");
                    assert!(same_bits(&logits, &l2), "first-token logits: {what}");
                    assert!(
                        last.iter()
                            .zip(&last2)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "final state: {what}"
                    );
                    for (i, ((k, v), (k2, v2))) in cache.iter().zip(&c2).enumerate() {
                        assert!(
                            same_bits(k, k2) && same_bits(v, v2),
                            "cache layer {i}: {what}"
                        );
                    }
                    if let (Some(h), Some(h2)) = (&head_cache, &h2) {
                        for (i, ((k, v), (k2, v2))) in h.iter().zip(h2).enumerate() {
                            assert!(
                                same_bits(k, k2) && same_bits(v, v2),
                                "head cache layer {i}: {what}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The native prefill computes what torch's does: f32 logits and caches agree closely (the
/// two sum in different orders), bf16 within bf16's rounding.
#[test]
fn native_prefill_is_close_to_torch() {
    for model in ["mha_untied", "gqa_tied_headdim", "llama3_rope"] {
        for (kind, tol) in [(Kind::Float, 1e-4), (Kind::BFloat16, 0.1)] {
            let base = load_as(model, kind);
            let head = final_state_head(&base);
            let ids = prompt(&base, 60);
            let native = NativeBackend::new(&base, Some(&head)).unwrap();
            let torch = TorchBackend::new(&base, Some(&head), 9);
            let (logits, _, cache, head_cache) = prefill(&native, &ids, true);
            let (mut tc, mut thc) = torch.new_caches(ids.len(), 4, true);
            let (tl, _) = torch.prefill(&ids, &mut tc, thc.as_mut()).unwrap();
            let gap = |a: &Tensor, b: &Tensor| {
                let scale = b.abs().max().double_value(&[]).max(1.0);
                (a - b).abs().max().double_value(&[]) / scale
            };
            let what = format!("{model} {kind:?}");
            let g = gap(&logits, &tl.to_kind(Kind::Float));
            assert!(g < tol, "logits differ by {g} (relative): {what}");
            for ((k, v), (tk, tv)) in cache.iter().zip(&filled(&tc)) {
                assert!(gap(k, tk) < tol && gap(v, tv) < tol, "base cache: {what}");
            }
            for ((k, v), (tk, tv)) in head_cache
                .unwrap()
                .iter()
                .zip(&filled(thc.as_ref().unwrap()))
            {
                assert!(gap(k, tk) < tol && gap(v, tv) < tol, "head cache: {what}");
            }
        }
    }
}

/// A prompt prefilled in parts (what the server does between rounds) leaves the caches, the
/// first token's logits and the final state bit for bit as one prefill does, with a head that
/// reads the final state across the parts' boundaries.
#[test]
fn parts_between_rounds_do_not_change_a_bit() {
    let base = load_as("mha_untied", Kind::BFloat16);
    let head = final_state_head(&base);
    let ids = prompt(&base, 100);
    let mut backend = NativeBackend::new(&base, Some(&head)).unwrap();
    backend.prefill_chunk = 16;
    let (logits, last, cache, head_cache) = prefill(&backend, &ids, true);
    for part in [16usize, 48, 96] {
        let (mut c, mut hc) = backend.new_caches(ids.len(), 4, true);
        let mut out = None;
        for piece in ids.chunks(part) {
            let before = out.as_ref().map(|(_, h)| h);
            out = Some(
                backend
                    .prefill_part(piece, before, &mut c, hc.as_mut())
                    .unwrap(),
            );
        }
        let (l2, last2) = out.unwrap();
        assert!(same_bits(&logits, &l2), "logits, parts of {part}");
        assert!(
            last.iter()
                .zip(&last2.data)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "final state, parts of {part}"
        );
        let (c2, h2) = (filled(&c), filled(hc.as_ref().unwrap()));
        for (layer, ((k, v), (k2, v2))) in cache.iter().zip(&c2).enumerate() {
            assert!(
                same_bits(k, k2) && same_bits(v, v2),
                "cache layer {layer}, parts of {part}"
            );
        }
        for ((k, v), (k2, v2)) in head_cache.as_ref().unwrap().iter().zip(&h2) {
            assert!(
                same_bits(k, k2) && same_bits(v, v2),
                "head cache, parts of {part}"
            );
        }
    }
}
