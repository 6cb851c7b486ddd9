//! Losslessness of speculative decoding on the committed tiny models (fast, no setup needed):
//! greedy output token-identical to plain decoding for every controller, head kind and draft
//! vocabulary; sampled output distributed as the base's processed distribution (chi-square).

use eesd_core::config::LlamaConfig;
use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
use eesd_core::model::Llama;
use eesd_core::sampling::SamplingParams;
use eesd_core::weights::Weights;
use eesd_infer::backends::{Kernels, NativeBackend, TorchBackend};
use eesd_infer::controller::{parse, Controller, Costs, Fixed, Next, Outcome, ThompsonConfig};
use eesd_infer::engine::{DraftSources, Engine, GenerateOptions, Request};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

const CONTROLLERS: &[&str] = &[
    "thompson",
    "thompson-calibrated",
    "fixed:1",
    "fixed:4",
    "heuristic",
    "confidence:0.3",
    "off",
];

/// Runs `$body` with `$engine` on the backend `$kernels` names, drafting at most `$k_max`
/// tokens a round, invariants checked after every round. The torch backend always verifies 9
/// rows (its static shape), so plain and speculative engines share one kernel shape.
macro_rules! on_backend {
    ($kernels:expr, $base:expr, $head:expr, $k_max:expr, |$engine:ident| $body:expr) => {
        match $kernels {
            Kernels::Native => {
                let backend = NativeBackend::new($base, $head).unwrap();
                let mut $engine = Engine::new(backend, $k_max);
                $engine.check_invariants = true;
                $body
            }
            Kernels::Torch => {
                let backend = TorchBackend::new($base, $head, 9);
                let mut $engine = Engine::new(backend, $k_max);
                $engine.check_invariants = true;
                $body
            }
        }
    };
}

/// Plain decoding of `prompt` (no head, controller `off`) on `kernels`.
fn plain(base: &Llama, kernels: Kernels, prompt: &[u32], o: &GenerateOptions) -> Vec<u32> {
    on_backend!(kernels, base, None, 1, |engine| {
        engine
            .generate(prompt, o, &mut Fixed(0), |_| {})
            .unwrap()
            .ids
    })
}

/// Torch's random generator is global: a test reseeding it (`head`, `prompts`) while the
/// sampling test draws from it repeats that test's draws and can fail its chi-square test.
/// The tests of this file therefore take turns.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn rng_turn() -> MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn device() -> Device {
    match std::env::var("EESD_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

fn load(name: &str) -> Llama {
    load_as(name, Kind::Float)
}

fn load_as(name: &str, kind: Kind) -> Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../eesd-core/tests/fixtures")
        .join(name);
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    Llama::load(cfg, &Weights::open_dir(&dir, kind, device()).unwrap()).unwrap()
}

/// The kernel paths and dtypes whose verification must equal plain decoding bit for bit:
/// every dtype, on the native CPU kernels (batch-invariant by construction) and on torch
/// (static shapes: plain steps run the verify width too), on CPU, and on CUDA when tested there.
fn exact_paths() -> Vec<(Kernels, Kind)> {
    let torch = [
        (Kernels::Torch, Kind::Float),
        (Kernels::Torch, Kind::BFloat16),
        (Kernels::Torch, Kind::Half),
    ];
    if device().is_cuda() {
        return torch.to_vec();
    }
    let mut v = vec![
        (Kernels::Native, Kind::Float),
        (Kernels::Native, Kind::BFloat16),
        (Kernels::Native, Kind::Half),
    ];
    v.extend(torch);
    v
}

/// A head for `base`: random (a poor draft) or, at N = L - 1 with a copy of the last layer, an
/// exact replica of the base (a perfect draft).
fn head(base: &Llama, init: HeadInit, exit: usize, vocab: Option<&[u32]>) -> EarlyExitHead {
    tch::manual_seed(42);
    let mut spec = HeadSpec::for_base(base, "test", exit);
    spec.init = init;
    EarlyExitHead::init(base, spec, vocab).unwrap()
}

/// A head that also reads the previous position's final state, its projection random (a
/// trained one is; a new one is zero and would read nothing).
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

/// The head's first-draft distribution at every position of `seq`, teacher-forced in one
/// torch pass (what the trainer optimises): argmax and top-1 probability per position.
fn teacher_forced_drafts(base: &Llama, head: &EarlyExitHead, seq: &[u32]) -> (Vec<i64>, Vec<f32>) {
    let _g = tch::no_grad_guard();
    let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
    let ids = Tensor::from_slice(&ids).to_device(base.device).unsqueeze(0);
    let n = head.spec.exit_layer;
    let mut cache = base.new_cache(1, seq.len() as i64);
    let h = base.forward_layers(&base.embed(&ids), 0..n, &mut cache);
    let finals = base.final_norm(&base.forward_layers(&h, n..base.num_layers(), &mut cache));
    let prev = eesd_core::head::previous_positions(&finals);
    let mut hc = head.new_cache(base, 1, seq.len() as i64);
    let probs = head
        .forward(base, &h, Some(&prev), &mut hc)
        .squeeze_dim(0)
        .softmax(-1, Kind::Float)
        .to_device(Device::Cpu);
    let (top, arg) = probs.max_dim(-1, false);
    (
        Vec::<i64>::try_from(arg).unwrap(),
        Vec::<f32>::try_from(top).unwrap(),
    )
}

/// One draft per round, recording each draft's top-1 probability.
struct Recorder(Vec<f32>);

impl Controller for Recorder {
    fn plan(&mut self, _: &Costs) -> usize {
        1
    }
    fn wants_confidence(&self) -> bool {
        true
    }
    fn after_draft(&mut self, _: usize, confidence: f32, _: &Costs) -> Next {
        self.0.push(confidence);
        Next::Continue
    }
    fn observe(&mut self, _: &Outcome) {}
    fn name(&self) -> String {
        "recorder".into()
    }
}

/// The decoder feeds a final-state head the states it was trained on: with one draft per
/// round, each draft's distribution is the teacher-forced one at the pending position (the
/// prompt's final states come from the prefill, later ones from each verification, whether
/// the round's draft was accepted or not), and the final states do change it.
#[test]
fn a_final_state_head_reads_the_verified_states_of_the_previous_positions() {
    let _turn = rng_turn();
    let base = load("gqa_tied_headdim");
    // A replica of the base (N = L - 1, a copy of the last layer), perturbed through the
    // final-state input: most drafts are accepted, some are not.
    let l = base.num_layers();
    tch::manual_seed(44);
    let mut spec = HeadSpec::for_base(&base, "test", l - 1);
    spec.final_state_input = true;
    let mut head = EarlyExitHead::init(&base, spec, None).unwrap();
    let f = head.final_state.as_mut().unwrap();
    f.proj = f.proj.randn_like() * 0.2;
    let max_new = 24;
    let o = opts(max_new, SamplingParams::default());
    let (mut rejected, mut accepted) = (0, 0);
    for kernels in [Kernels::Native, Kernels::Torch] {
        for p in prompts(&base, 6) {
            let want = plain(&base, kernels, &p, &o);
            let mut rec = Recorder(Vec::new());
            let got = on_backend!(kernels, &base, Some(&head), 1, |engine| {
                engine.generate(&p, &o, &mut rec, |_| {}).unwrap()
            });
            assert_eq!(got.ids, want, "{kernels:?}");
            let seq: Vec<u32> = p.iter().chain(&want).copied().collect();
            let (arg, top) = teacher_forced_drafts(&base, &head, &seq);
            // Replay the rounds: pending is generated token n - 1 (sequence index i); a draft
            // equal to the next token is accepted and skips it.
            let (mut n, mut round) = (1, 0);
            while n < want.len() && max_new - n > 1 {
                let i = p.len() + n - 1;
                let conf = rec.0[round];
                assert!(
                    (conf - top[i]).abs() < 1e-4,
                    "{kernels:?}, round {round}: draft probability {conf}, teacher-forced {}",
                    top[i]
                );
                if arg[i] == seq[i + 1] as i64 {
                    accepted += 1;
                    n += 1;
                } else {
                    rejected += 1;
                }
                n += 1;
                round += 1;
            }
            assert_eq!(rec.0.len(), round, "{kernels:?}: rounds that drafted");
        }
    }
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected drafts"
    );
    // The final states matter: without them the same head drafts with other probabilities,
    // by far more than the tolerance above (1e-4).
    let seq = &prompts(&base, 1)[0];
    let with = teacher_forced_drafts(&base, &head, seq).1;
    let mut blind = head;
    blind.final_state = None;
    let without = teacher_forced_drafts(&base, &blind, seq).1;
    let gap = with
        .iter()
        .zip(&without)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap > 1e-3,
        "the final states moved a draft probability by {gap} at most"
    );
}

fn prompts(base: &Llama, n: usize) -> Vec<Vec<u32>> {
    tch::manual_seed(7);
    (0..n)
        .map(|i| {
            let len = 3 + (i * 5) % 17;
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
        })
        .collect()
}

/// The controller `name` with drafts of at most `k_max`.
fn controller(name: &str, k_max: usize) -> Box<dyn Controller> {
    parse(
        name,
        &ThompsonConfig {
            k_max,
            ..Default::default()
        },
    )
    .unwrap()
}

fn opts(max_new: usize, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new,
        sampling,
        eos_ids: vec![2],
    }
}

#[test]
fn greedy_equals_plain_for_every_controller_and_head() {
    let _turn = rng_turn();
    for (kernels, kind) in exact_paths() {
        for model in ["mha_untied", "gqa_tied_headdim", "llama3_rope"] {
            greedy_equals_plain(model, kernels, kind);
        }
    }
}

fn greedy_equals_plain(model: &str, kernels: Kernels, kind: Kind) {
    {
        let base = load_as(model, kind);
        let l = base.num_layers();
        let top: Vec<u32> = (0..64).collect();
        let heads = [
            ("random", head(&base, HeadInit::Random, 1, None)),
            ("final-state input", final_state_head(&base)),
            ("perfect", head(&base, HeadInit::LastLayer, l - 1, None)),
            (
                "exit-layer init, reduced vocab",
                head(&base, HeadInit::ExitLayer, 1, Some(&top)),
            ),
        ];
        let o = opts(24, SamplingParams::default());
        for p in prompts(&base, 6) {
            let want = plain(&base, kernels, &p, &o);
            for (hname, h) in &heads {
                on_backend!(kernels, &base, Some(h), 6, |engine| {
                    engine.calibrate(16, 2).unwrap();
                    for name in CONTROLLERS {
                        let mut c = controller(name, 6);
                        let got = engine.generate(&p, &o, c.as_mut(), |_| {}).unwrap();
                        assert_eq!(
                            got.ids, want,
                            "{model} {kernels:?} {kind:?}, {hname} head, {name}"
                        );
                        let s = &got.stats;
                        assert!(s.accepted <= s.drafted && s.rounds <= got.ids.len());
                        if *hname == "perfect" && *name == "fixed:4" && got.ids.len() > 8 {
                            assert!(
                                s.acceptance_rate() > 0.99,
                                "a replica draft is always accepted: {s:?}"
                            );
                        }
                    }
                });
            }
        }
    }
}

/// Drafts copied from the text (alone, without a head, and mixed with a head's) give plain
/// decoding's greedy output on every exact path; prompts that repeat themselves, as the
/// random models' answers do, make copied rounds happen.
#[test]
fn copied_drafts_equal_plain_greedy() {
    let _turn = rng_turn();
    let o = opts(40, SamplingParams::default());
    for (kernels, kind) in exact_paths() {
        for model in ["mha_untied", "gqa_tied_headdim"] {
            let base = load_as(model, kind);
            let h = head(&base, HeadInit::Random, 1, None);
            let mut copied = 0;
            for p in prompts(&base, 4) {
                let p: Vec<u32> = p.iter().chain(&p).chain(&p).copied().collect();
                let want = plain(&base, kernels, &p, &o);
                for (sources, with_head) in [("lookup", None), ("head,lookup", Some(&h))] {
                    on_backend!(kernels, &base, with_head, 6, |engine| {
                        engine.sources = DraftSources::parse(sources).unwrap();
                        for name in ["thompson", "fixed:2"] {
                            let mut c = controller(name, 6);
                            let got = engine.generate(&p, &o, c.as_mut(), |_| {}).unwrap();
                            assert_eq!(
                                got.ids, want,
                                "{model} {kernels:?} {kind:?} {sources} {name}"
                            );
                            copied += got.stats.copied_rounds;
                        }
                    });
                }
            }
            assert!(
                copied > 0,
                "{model} {kernels:?} {kind:?}: no copied round ran"
            );
        }
    }
}

#[test]
fn off_without_a_head_is_plain_decoding() {
    let _turn = rng_turn();
    let base = load("gqa_tied_headdim");
    let o = opts(20, SamplingParams::default());
    let kernels = Kernels::parse(None, base.device).unwrap();
    for p in prompts(&base, 4) {
        let want = plain(&base, kernels, &p, &o);
        let mut c = parse("thompson", &ThompsonConfig::default()).unwrap();
        let got = on_backend!(kernels, &base, None, 4, |engine| {
            engine.generate(&p, &o, c.as_mut(), |_| {}).unwrap()
        });
        assert_eq!(got.ids, want);
        assert_eq!(got.stats.drafted, 0);
    }
}

/// Distribution of the first two generated tokens (the second comes from a speculative round),
/// over many seeded runs, against the exact marginal computed from the base.
#[test]
fn sampled_tokens_follow_the_base_distribution() {
    let _turn = rng_turn();
    let base = load("mha_untied");
    let l = base.num_layers();
    let sampling = SamplingParams::new(1.0, 12, 0.9).unwrap();
    let prompt: Vec<u32> = vec![5, 9, 17, 33];
    // Exact marginal of the second token: sum over x1 of p(x1) p(x2 | x1).
    let _g = tch::no_grad_guard();
    let p1 = {
        let mut c = base.new_cache(1, 8);
        let ids = Tensor::from_slice(&[5i64, 9, 17, 33])
            .to_device(device())
            .unsqueeze(0);
        let lg = base.forward(&ids, &mut c).select(1, -1);
        Vec::<f32>::try_from(sampling.probs(&lg).squeeze().to_device(Device::Cpu)).unwrap()
    };
    let v = base.cfg.vocab_size;
    let mut marginal = vec![0f64; v];
    // Runs whose first token is EOS (id 2) end there; they are left out on both sides.
    for (x1, &px1) in p1.iter().enumerate().filter(|&(x, &p)| p > 0.0 && x != 2) {
        let mut c = base.new_cache(1, 8);
        let ids = Tensor::from_slice(&[5i64, 9, 17, 33, x1 as i64])
            .to_device(device())
            .unsqueeze(0);
        let lg = base.forward(&ids, &mut c).select(1, -1);
        let p2 =
            Vec::<f32>::try_from(sampling.probs(&lg).squeeze().to_device(Device::Cpu)).unwrap();
        for (x2, &q) in p2.iter().enumerate() {
            marginal[x2] += px1 as f64 * q as f64;
        }
    }
    // A poor draft: the layer-1 exit with logits scaled by 4, far sharper than the base.
    let mut poor = head(&base, HeadInit::Random, 1, None);
    poor.norm.weight = &poor.norm.weight * 4.0;
    for (hname, h) in [
        ("poor", poor),
        ("good", head(&base, HeadInit::LastLayer, l - 1, None)),
    ] {
        let kernels = Kernels::parse(None, base.device).unwrap();
        let n = 3000;
        let o = opts(4, sampling); // room for drafts after the first token
        let counts = on_backend!(kernels, &base, Some(&h), 4, |engine| {
            engine.calibrate(8, 1).unwrap();
            let mut counts = vec![0f64; v];
            tch::manual_seed(123);
            for _ in 0..n {
                let mut c = parse(
                    "fixed:3",
                    &ThompsonConfig {
                        k_max: 4,
                        ..Default::default()
                    },
                )
                .unwrap();
                let g = engine.generate(&prompt, &o, c.as_mut(), |_| {}).unwrap();
                if g.ids[0] == 2 {
                    continue; // EOS first: no second token (counted in neither)
                }
                counts[g.ids[1] as usize] += 1.0;
            }
            counts
        });
        let total: f64 = counts.iter().sum();
        let eos_mass = p1[2] as f64;
        // Pool cells with small expectation so the chi-square approximation holds.
        let (mut chi2, mut df, mut pool_o, mut pool_e) = (0.0, 0usize, 0.0, 0.0);
        for x in 0..v {
            let e = total * marginal[x] / (1.0 - eos_mass).max(1e-9);
            if e < 5.0 {
                pool_o += counts[x];
                pool_e += e;
                assert!(
                    marginal[x] > 0.0 || counts[x] == 0.0,
                    "{hname}: token {x} has probability 0 but was emitted"
                );
            } else {
                chi2 += (counts[x] - e).powi(2) / e;
                df += 1;
            }
        }
        if pool_e > 0.0 {
            chi2 += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
            df += 1;
        }
        df = df.saturating_sub(1).max(1);
        // Critical value at p = 0.001: df + 3.1 sqrt(2 df) + 3 is above the exact value for df >= 5.
        let critical = df as f64 + 3.1 * (2.0 * df as f64).sqrt() + 3.0;
        assert!(
            chi2 < critical,
            "{hname} draft: chi2 = {chi2:.1} with {df} df (critical {critical:.1})"
        );
    }
}

/// The engine steps many sequences at once: in batches of 1, 3 and 8 with mixed prompts,
/// lengths and controllers (plain ones among them), every sequence's greedy output equals its
/// output alone, on the native kernels (one pass for all rows) and on torch.
#[test]
fn batched_sequences_equal_each_alone() {
    let _turn = rng_turn();
    let controllers = [
        "thompson",
        "fixed:3",
        "off",
        "confidence:0.3",
        "fixed:1",
        "heuristic",
        "thompson-calibrated",
        "fixed:4",
    ];
    let cfg = ThompsonConfig {
        k_max: 4,
        ..Default::default()
    };
    let paths: Vec<(Kernels, Kind)> = exact_paths()
        .into_iter()
        .filter(|(_, kind)| *kind != Kind::Half)
        .collect();
    for (kernels, kind) in paths {
        let base = load_as("gqa_tied_headdim", kind);
        let l = base.num_layers();
        let good = head(&base, HeadInit::LastLayer, l - 1, None);
        let prompts = prompts(&base, 8);
        // Lengths differ, and one prompt stops at its first EOS (id 2) where it meets one.
        let opts_of = |i: usize| opts(4 + 5 * i, SamplingParams::default());
        let alone: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                on_backend!(kernels, &base, Some(&good), 4, |engine| {
                    let mut c = parse(controllers[i], &cfg).unwrap();
                    engine
                        .generate(&prompts[i], &opts_of(i), c.as_mut(), |_| {})
                        .unwrap()
                        .ids
                })
            })
            .collect();
        for batch in [1usize, 3, 8] {
            let got = on_backend!(kernels, &base, Some(&good), 4, |engine| {
                let requests = (0..batch)
                    .map(|i| Request {
                        prompt: &prompts[i],
                        opts: opts_of(i),
                        controller: parse(controllers[i], &cfg).unwrap(),
                    })
                    .collect();
                engine.generate_batch(requests).unwrap()
            });
            for (i, g) in got.iter().enumerate() {
                assert_eq!(
                    g.ids, alone[i],
                    "{kernels:?} {kind:?}: sequence {i} ({}) in a batch of {batch}",
                    controllers[i]
                );
            }
            let drafted: usize = got.iter().map(|g| g.stats.drafted).sum();
            assert!(batch == 1 || drafted > 0, "the batch drafted nothing");
        }
    }
}
