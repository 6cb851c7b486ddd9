//! The cache and layer-range identities the speculative decoder relies on.

mod common;
use common::*;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// Logits of a fresh full forward over `ids` `[1, T]`.
fn full(model: &eesd_core::model::Llama, ids: &Tensor) -> Tensor {
    let mut cache = model.new_cache(1, ids.size()[1] + 8);
    model.forward(ids, &mut cache)
}

#[test]
fn incremental_decoding_equals_full_forward() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let m = load(name);
        let ids = ids(1, 24, m.cfg.vocab_size as i64, 1);
        let want = full(&m, &ids);
        let mut cache = m.new_cache(1, 32);
        let mut got = vec![m.forward(&ids.narrow(1, 0, 10), &mut cache)];
        for i in 10..24 {
            got.push(m.forward(&ids.narrow(1, i, 1), &mut cache));
        }
        let d = max_diff(&Tensor::cat(&got, 1), &want);
        assert!(d <= TOL, "{name}: {d:e}");
    }
}

#[test]
fn split_layer_ranges_equal_the_whole() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let m = load(name);
        let l = m.num_layers();
        let ids = ids(1, 16, m.cfg.vocab_size as i64, 2);
        let want = full(&m, &ids);
        for n in 1..l {
            let mut cache = m.new_cache(1, 16);
            let h = m.forward_layers(&m.embed(&ids), 0..n, &mut cache);
            let h = m.forward_layers(&h, n..l, &mut cache);
            let d = max_diff(&m.logits(&m.final_norm(&h)), &want);
            assert!(d <= TOL, "{name} N={n}: {d:e}");
        }
        // [0, N) may run ahead of [N, L) (drafting), and [N, L) catches up in one call.
        let mut cache = m.new_cache(1, 16);
        let mut lower = Vec::new();
        for i in 0..16 {
            lower.push(m.forward_layers(&m.embed(&ids.narrow(1, i, 1)), 0..1, &mut cache));
        }
        assert_eq!((cache.len(0), cache.len(l - 1)), (16, 0));
        let h = m.forward_layers(&Tensor::cat(&lower, 1), 1..l, &mut cache);
        let d = max_diff(&m.logits(&m.final_norm(&h)), &want);
        assert!(d <= TOL, "{name} lagging upper layers: {d:e}");
    }
}

#[test]
fn truncate_then_recompute_equals_a_fresh_run() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let m = load(name);
        let v = m.cfg.vocab_size as i64;
        let a = ids(1, 20, v, 3);
        let b = ids(1, 6, v, 4);
        let mut cache = m.new_cache(1, 32);
        let _ = m.forward(&a, &mut cache); // 20 positions, then roll back the last 6 ...
        cache.truncate(14);
        assert_eq!(cache.len(0), 14);
        let got = m.forward(&b, &mut cache); // ... and write 6 others there
        let want = full(&m, &Tensor::cat(&[a.narrow(1, 0, 14), b], 1)).narrow(1, 14, 6);
        let d = max_diff(&got, &want);
        assert!(d <= TOL, "{name}: {d:e}");
    }
}

#[test]
fn multi_token_step_equals_single_steps() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let m = load(name);
        let ids = ids(1, 18, m.cfg.vocab_size as i64, 5);
        let mut c1 = m.new_cache(1, 18);
        let _ = m.forward(&ids.narrow(1, 0, 12), &mut c1);
        let multi = m.forward(&ids.narrow(1, 12, 6), &mut c1);
        let mut c2 = m.new_cache(1, 18);
        let _ = m.forward(&ids.narrow(1, 0, 12), &mut c2);
        let singles: Vec<Tensor> = (12..18)
            .map(|i| m.forward(&ids.narrow(1, i, 1), &mut c2))
            .collect();
        let d = max_diff(&multi, &Tensor::cat(&singles, 1));
        assert!(d <= TOL, "{name}: {d:e}");
    }
}

#[test]
fn left_padded_batch_equals_rows_run_alone() {
    let _g = tch::no_grad_guard();
    let m = load("gqa_tied_headdim");
    let v = m.cfg.vocab_size as i64;
    let (long, short) = (ids(1, 12, v, 6), ids(1, 7, v, 7));
    let padded = Tensor::cat(
        &[
            Tensor::zeros([1, 5], (Kind::Int64, long.device())),
            short.shallow_clone(),
        ],
        1,
    );
    let batch = Tensor::cat(&[long.shallow_clone(), padded], 0);
    let mut cache = m.new_cache(2, 16);
    cache.set_left_padding(&[0, 5]);
    let mut got = vec![m.forward(&batch, &mut cache)];
    // Two decode steps for both rows at once.
    let next = ids(2, 2, v, 8);
    got.push(m.forward(&next.narrow(1, 0, 1), &mut cache));
    got.push(m.forward(&next.narrow(1, 1, 1), &mut cache));
    let got = Tensor::cat(&got, 1); // [2, 14, V]
    let want0 = full(&m, &Tensor::cat(&[long, next.get(0).unsqueeze(0)], 1));
    let want1 = full(&m, &Tensor::cat(&[short, next.get(1).unsqueeze(0)], 1));
    assert!(max_diff(&got.get(0), &want0.get(0)) <= TOL);
    assert!(max_diff(&got.get(1).narrow(0, 5, 9), &want1.get(0)) <= TOL);
    assert!(
        bool::try_from(got.isfinite().all()).unwrap(),
        "padding rows stay finite"
    );
}

/// The static-shape path (attention over the whole cache, writes and positions from a device
/// offset: what CUDA graphs record) computes what the dynamic path does: prompt, single steps
/// and a multi-row step with padding rows after the real ones, then a rollback.
#[test]
fn static_shapes_at_a_device_offset_equal_the_dynamic_path() {
    let _g = tch::no_grad_guard();
    for name in CASES {
        let m = load(name);
        let (v, l) = (m.cfg.vocab_size as i64, m.num_layers());
        let ids = ids(1, 20, v, 9);
        let want = full(&m, &ids);
        let mut cache = m.new_cache(1, 64);
        cache.set_static_shapes(true);
        let mut got = vec![m.forward(&ids.narrow(1, 0, 12), &mut cache)];
        for i in 12..16 {
            let at = cache.len(0);
            let off = Tensor::from_slice(&[at]).to_device(device());
            let h = m.forward_layers_at(&m.embed(&ids.narrow(1, i, 1)), 0..l, &mut cache, at, &off);
            got.push(m.logits(&m.final_norm(&h)));
        }
        // Four real rows and five padding rows in one pass; the padding is then dropped.
        let at = cache.len(0);
        let pad = Tensor::zeros([1, 5], (Kind::Int64, ids.device()));
        let rows = Tensor::cat(&[ids.narrow(1, 16, 4), pad], 1);
        let off = Tensor::from_slice(&[at]).to_device(device());
        let h = m.forward_layers_at(&m.embed(&rows), 0..l, &mut cache, at, &off);
        cache.truncate(at + 4);
        got.push(m.logits(&m.final_norm(&h)).narrow(1, 0, 4));
        let d = max_diff(&Tensor::cat(&got, 1), &want);
        assert!(d <= TOL, "{name}: {d:e}");
        // Rolling back over the padding and rewriting gives the same again.
        cache.truncate(18);
        let at = cache.len(0);
        let off = Tensor::from_slice(&[at]).to_device(device());
        let h = m.forward_layers_at(&m.embed(&ids.narrow(1, 18, 2)), 0..l, &mut cache, at, &off);
        let d = max_diff(&m.logits(&m.final_norm(&h)), &want.narrow(1, 18, 2));
        assert!(d <= TOL, "{name} after rollback: {d:e}");
    }
}

/// CPU models for the native kernel tests (the native path is CPU only, so these run on the
/// CPU whatever the test device): a head size on the blocked attention path (64) in every
/// weight dtype, and the fixtures (head sizes off it).
fn native_models() -> Vec<(String, eesd_core::model::Llama)> {
    use eesd_core::config::LlamaConfig;
    use eesd_core::model::Llama;
    let mut cfg = LlamaConfig::named_shape("smollm2-135m").expect("shape");
    (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) = (256, 512, 2);
    (
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    ) = (4, 2, 64, 512);
    let mut models: Vec<(String, Llama)> = Vec::new();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        tch::manual_seed(3);
        models.push((
            format!("hd64 {kind:?}"),
            Llama::random(cfg.clone(), kind, Device::Cpu),
        ));
    }
    for name in CASES {
        models.push((name.to_string(), load_on(name, Device::Cpu)));
    }
    models
}

/// `n` deterministic token ids below `vocab`.
fn host_ids(n: i64, vocab: usize, seed: i64) -> Vec<u32> {
    Vec::<i64>::try_from(
        ids(1, n, vocab as i64, seed)
            .view([-1])
            .to_device(Device::Cpu),
    )
    .unwrap()
    .into_iter()
    .map(|t| t as u32)
    .collect()
}

/// A cache holding `prompt`, filled by torch (as the prefill does).
fn prefilled(
    m: &eesd_core::model::Llama,
    prompt: &[u32],
    capacity: i64,
) -> eesd_core::cache::KvCache {
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut cache = m.new_cache(1, capacity);
    let _ = m.forward(&Tensor::from_slice(&ids).unsqueeze(0), &mut cache);
    cache
}

/// The native kernels' promise that speculative verification rests on (issue 7): k+1 rows run
/// together through every layer and the LM head give each row exactly the bits of k+1
/// single-row steps, in every weight dtype, for head sizes on the blocked attention path (64)
/// and off it (the fixtures').
#[test]
fn native_rows_together_have_the_bits_of_single_steps() {
    use eesd_core::native::NativeModel;
    let _g = tch::no_grad_guard();
    for (name, m) in &native_models() {
        let native = NativeModel::new(m).expect("native views");
        let layers = m.cfg.num_layers;
        let host = host_ids(40, m.cfg.vocab_size, 9);
        let (prompt, rows) = (33, 7);
        let mut together = prefilled(m, &host[..prompt], 48);
        let mut alone = prefilled(m, &host[..prompt], 48);
        let mut x = native.embed(&host[prompt..prompt + rows]);
        native
            .forward_layers(&mut x, rows, 0..layers, &mut together)
            .unwrap();
        let batched = native.logits(&x, rows);
        let singles: Vec<Tensor> = (prompt..prompt + rows)
            .map(|i| {
                let mut x = native.embed(&host[i..i + 1]);
                native
                    .forward_layers(&mut x, 1, 0..layers, &mut alone)
                    .unwrap();
                native.logits(&x, 1)
            })
            .collect();
        let singles = Tensor::cat(&singles, 0);
        assert!(
            batched.equal(&singles),
            "{name}: rows together differ from single steps by {:e}",
            max_diff(&batched, &singles)
        );
    }
}

/// The engine's batching rests on this: rows of different sequences (other prompts, other
/// cache lengths, other row counts) in one pass give each sequence exactly the bits it gets
/// alone, in every weight dtype.
#[test]
fn native_rows_of_different_sequences_have_the_bits_of_each_alone() {
    use eesd_core::native::{NativeModel, Segment};
    let _g = tch::no_grad_guard();
    for (name, m) in &native_models() {
        let native = NativeModel::new(m).expect("native views");
        let layers = m.cfg.num_layers;
        // (prompt length, rows this pass) of three sequences.
        let shapes = [(5usize, 1usize), (29, 4), (14, 2)];
        let seqs: Vec<Vec<u32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(p, r))| host_ids((p + r) as i64, m.cfg.vocab_size, 20 + i as i64))
            .collect();
        let mut together: Vec<_> = seqs
            .iter()
            .zip(&shapes)
            .map(|(s, &(p, _))| prefilled(m, &s[..p], 40))
            .collect();
        let mut x: Vec<f32> = seqs
            .iter()
            .zip(&shapes)
            .flat_map(|(s, &(p, r))| native.embed(&s[p..p + r]))
            .collect();
        let mut segs: Vec<Segment> = together
            .iter_mut()
            .zip(&shapes)
            .map(|(cache, &(_, rows))| Segment { cache, rows })
            .collect();
        native
            .forward_layers_batch(&mut x, &mut segs, 0..layers)
            .unwrap();
        let batched = native.logits(&x, shapes.iter().map(|s| s.1).sum());
        let mut first = 0;
        for (i, (s, &(p, r))) in seqs.iter().zip(&shapes).enumerate() {
            let mut alone = prefilled(m, &s[..p], 40);
            let mut x = native.embed(&s[p..p + r]);
            native
                .forward_layers(&mut x, r, 0..layers, &mut alone)
                .unwrap();
            let want = native.logits(&x, r);
            let got = batched.narrow(0, first as i64, r as i64);
            assert!(
                got.equal(&want),
                "{name}: sequence {i} batched differs from alone by {:e}",
                max_diff(&got, &want)
            );
            assert_eq!(
                together[i].len(0),
                (p + r) as i64,
                "{name}: cache of sequence {i}"
            );
            first += r;
        }
    }
}

/// Teacher generation on the native kernels (`generate_native`, what `eesd-train gen` runs on
/// the CPU): three prompts of different lengths decoded together, the longest in several
/// prefill chunks, give each the tokens of that prompt fed one row at a time and then decoded
/// greedily by hand alone, in every weight dtype (one answer ends early at an EOS, so the
/// batch shrinks); in f32 also torch's batched generation's.
#[test]
fn native_generation_equals_row_by_row_decoding() {
    use eesd_core::generate::{generate_batch, generate_native, GenerateOptions};
    use eesd_core::native::NativeModel;
    let _g = tch::no_grad_guard();
    for (name, m) in native_models() {
        let nm = NativeModel::new(&m).unwrap();
        let long = (m.cfg.max_position_embeddings as i64 - 20).min(300);
        let prompts: Vec<Vec<u32>> = [(long, 11), (5, 12), (40, 13)]
            .iter()
            .map(|&(n, seed)| host_ids(n, m.cfg.vocab_size, seed))
            .collect();
        let mut opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: eesd_core::sampling::SamplingParams::new(0.0, 0, 1.0).unwrap(),
            eos_ids: vec![],
        };
        let alone = |p: &[u32], eos: &[u32]| {
            let mut cache = m.new_cache(1, p.len() as i64 + 16);
            let mut last = Vec::new();
            for &t in p {
                last = nm.embed(&[t]);
                nm.forward_layers(&mut last, 1, 0..m.num_layers(), &mut cache)
                    .unwrap();
            }
            let mut want = Vec::new();
            for _ in 0..12 {
                let next = nm.logits(&last, 1).argmax(-1, false).int64_value(&[0]) as u32;
                want.push(next);
                if eos.contains(&next) {
                    break;
                }
                last = nm.embed(&[next]);
                nm.forward_layers(&mut last, 1, 0..m.num_layers(), &mut cache)
                    .unwrap();
            }
            want
        };
        // The second prompt's 4th token as EOS: that answer ends there.
        opts.eos_ids = vec![alone(&prompts[1], &[])[3]];
        let got = generate_native(&nm, &m, &prompts, &opts).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &alone(p, &opts.eos_ids), "{name}");
        }
        assert!(got[1].len() <= 4, "{name}: the EOS did not end the answer");
        if name.contains("Float") {
            let torch = generate_batch(&m, &prompts, &opts).unwrap();
            assert_eq!(got, torch, "{name}: torch's greedy tokens");
        }
    }
}
