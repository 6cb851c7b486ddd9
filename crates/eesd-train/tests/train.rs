//! The trainer end to end on the tiny fixture model: gen -> distill -> a head that eesd-infer
//! loads; the base stays bit-identical; a resumed run ends where an unbroken one does; bad
//! input gives a clear error and leaves the last checkpoint intact.

use eesd_core::corpus::{self, TeacherRow};
use eesd_core::pretrained::Pretrained;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../eesd-core/tests/fixtures/mha_untied")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eesd-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eesd-train"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure: {err}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A prompt corpus over the fixture's word vocabulary (`w5 w17 ...`).
fn corpus_file(dir: &Path, n: usize) -> PathBuf {
    let rows: Vec<TeacherRow> = (0..n)
        .map(|i| TeacherRow {
            id: format!("toy/{i}"),
            prompt: (0..4 + i % 5)
                .map(|j| format!("w{}", 5 + (i * 7 + j * 3) % 120))
                .collect::<Vec<_>>()
                .join(" "),
            response: String::new(),
            prompt_ids: vec![],
            response_ids: vec![],
            base_fingerprint: String::new(),
        })
        .collect();
    let f = dir.join("corpus.parquet");
    corpus::write_teacher(&f, &rows).unwrap();
    f
}

fn gen(dir: &Path) -> PathBuf {
    let corpus = corpus_file(dir, 24);
    let out = dir.join("teacher");
    let m = fixture();
    ok(train(&[
        "gen",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "cpu",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "5",
        "--chunk",
        "10",
    ]));
    out
}

fn distill_args<'a>(m: &'a str, data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "--model",
        m,
        "--device",
        "cpu",
        "--data",
        data,
        "--out",
        out,
        "--exit-layer",
        "1",
        "--steps",
        steps,
        "--accum",
        "2",
        "--eval-every",
        "2",
        "--eval-examples",
        "4",
        "--warmup",
        "2",
        "--seed",
        "3",
    ]
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn gen_distill_and_the_head_loads_in_the_decoder() {
    let dir = tmp("e2e");
    let teacher = gen(&dir);
    let rows = corpus::read_teacher(teacher.to_str().unwrap()).unwrap();
    assert_eq!(rows.len(), 24);
    // Resume: a second gen over the same corpus has nothing left to do.
    let again = gen(&dir);
    assert_eq!(
        corpus::read_teacher(again.to_str().unwrap()).unwrap().len(),
        24
    );

    let m = fixture();
    let before = tensors(&m.join("model.safetensors"));
    let out = dir.join("run");
    let export = dir.join("exported");
    let mut args = distill_args(
        m.to_str().unwrap(),
        teacher.to_str().unwrap(),
        out.to_str().unwrap(),
        "4",
    );
    args.extend(["--draft-vocab", "64", "--export", export.to_str().unwrap()]);
    ok(train(&args));
    // The base is frozen: every weight bit-identical after training.
    let after = tensors(&m.join("model.safetensors"));
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert!(a.equal(b), "{n} changed");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    assert!(metrics.contains("top1_agreement"));

    // The exported head loads in the decoder and decodes losslessly.
    let p = Pretrained::load(m.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let head = eesd_core::head::EarlyExitHead::load(&export, &p.model, &p.fingerprint).unwrap();
    assert_eq!(head.draft_vocab_size(), 64);
    decodes_losslessly(&p, &head, &rows[..4]);
}

/// `head` drafts 3 tokens a round on each row's prompt: output equal to plain decoding.
fn decodes_losslessly(p: &Pretrained, head: &eesd_core::head::EarlyExitHead, rows: &[TeacherRow]) {
    use eesd_infer::backends::NativeBackend;
    use eesd_infer::engine::{Engine, GenerateOptions};
    let mut engine = Engine::new(NativeBackend::new(&p.model, Some(head)).unwrap(), 4);
    engine.check_invariants = true;
    engine.calibrate(8, 1).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 16,
        sampling: Default::default(),
        eos_ids: vec![],
    };
    for r in rows {
        let mut off = eesd_infer::controller::Fixed(0);
        let want = engine
            .generate(&r.prompt_ids, &opts, &mut off, |_| {})
            .unwrap()
            .ids;
        let mut c = eesd_infer::controller::parse("fixed:3", &Default::default()).unwrap();
        let got = engine
            .generate(&r.prompt_ids, &opts, c.as_mut(), |_| {})
            .unwrap();
        assert_eq!(got.ids, want);
        assert!(got.stats.drafted > 0);
    }
}

/// A two-layer head with the final-state input: its projection starts at zero and training
/// moves it; the exported head loads in the decoder, which feeds it verified final states (and
/// its own for later drafts) and stays lossless.
#[test]
fn a_final_state_head_trains_and_decodes() {
    let dir = tmp("final-state");
    let teacher = gen(&dir);
    let m = fixture();
    let out = dir.join("run");
    let export = dir.join("exported");
    let mut args = distill_args(
        m.to_str().unwrap(),
        teacher.to_str().unwrap(),
        out.to_str().unwrap(),
        "4",
    );
    args.extend([
        "--final-state-input",
        "--head-layers",
        "2",
        "--lr",
        "1e-2",
        "--export",
        export.to_str().unwrap(),
    ]);
    ok(train(&args));
    // --eval-only --export writes the evaluated head with its metrics (how a head trained
    // elsewhere ships: the decoder's Thompson prior reads top1_agreement).
    let evaluated = dir.join("evaluated");
    let mut eval_args = distill_args(
        m.to_str().unwrap(),
        teacher.to_str().unwrap(),
        out.to_str().unwrap(),
        "4",
    );
    eval_args.extend(["--eval-only", "--export", evaluated.to_str().unwrap()]);
    ok(train(&eval_args));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(evaluated.join("head.json")).unwrap())
            .unwrap();
    assert!(
        spec["metrics"]["top1_agreement"].as_f64().is_some(),
        "{spec}"
    );
    assert_eq!(spec["final_state_input"], true);
    let p = Pretrained::load(m.to_str().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let head = eesd_core::head::EarlyExitHead::load(&export, &p.model, &p.fingerprint).unwrap();
    assert!(head.spec.final_state_input && head.layers.len() == 2);
    let proj = &head
        .final_state
        .as_ref()
        .expect("the final-state input")
        .proj;
    assert!(
        proj.abs().max().double_value(&[]) > 0.0,
        "the zero-initialised projection never trained"
    );
    let rows = corpus::read_teacher(teacher.to_str().unwrap()).unwrap();
    decodes_losslessly(&p, &head, &rows[..4]);
}

#[test]
fn resumed_run_equals_an_unbroken_run() {
    let dir = tmp("resume");
    let teacher = gen(&dir);
    let m = fixture();
    let (m, t) = (m.to_str().unwrap(), teacher.to_str().unwrap());
    let whole = dir.join("whole");
    ok(train(&distill_args(m, t, whole.to_str().unwrap(), "6")));
    // The same run stopped after step 4 (a checkpoint), then resumed to 6.
    let split = dir.join("split");
    let mut first = distill_args(m, t, split.to_str().unwrap(), "6");
    first.extend(["--stop-after", "4"]);
    ok(train(&first));
    let mut resumed = distill_args(m, t, split.to_str().unwrap(), "6");
    resumed.push("--resume");
    let o = ok(train(&resumed));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming at step 4"));
    let steps: Vec<u64> = std::fs::read_to_string(split.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        vec![1, 2, 3, 4, 5, 6],
        "one metrics line per step across the resume"
    );
    let (a, b) = (
        tensors(&whole.join("checkpoint/head.safetensors")),
        tensors(&split.join("checkpoint/head.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d == 0.0, "{n}: resumed head differs by {d}");
    }
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tmp("bad");
    let m = fixture();
    let m = m.to_str().unwrap();
    let corpus = corpus_file(&dir, 4);
    let c = corpus.to_str().unwrap();
    // a corpus without the column
    clean_error(
        &train(&[
            "gen",
            "--model",
            m,
            "--data",
            c,
            "--prompt-column",
            "question",
            "--out",
            "/tmp/x",
        ]),
        "no column `question`",
    );
    // an empty corpus folder
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    clean_error(
        &train(&[
            "gen",
            "--model",
            m,
            "--data",
            empty.to_str().unwrap(),
            "--out",
            "/tmp/x",
        ]),
        "matches no parquet files",
    );
    // teacher data from another base
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    corpus::write_teacher(
        &foreign.join("part-00000.parquet"),
        &[TeacherRow {
            id: "x/0".into(),
            prompt: "w5".into(),
            response: "w6".into(),
            prompt_ids: vec![5],
            response_ids: vec![6],
            base_fingerprint: "llama-32x4096-0123456789abcdef".into(),
        }],
    )
    .unwrap();
    let out = dir.join("out");
    clean_error(
        &train(&distill_args(
            m,
            foreign.to_str().unwrap(),
            out.to_str().unwrap(),
            "2",
        )),
        "was made by base llama-32x4096",
    );
    // N outside [1, L-1]
    let teacher = gen(&dir);
    let t = teacher.to_str().unwrap();
    let mut args = distill_args(m, t, out.to_str().unwrap(), "2");
    let at = args.iter().position(|a| *a == "--exit-layer").unwrap() + 1;
    args[at] = "2";
    clean_error(&train(&args), "outside [1, 1]");
    // a head checkpoint of another model is refused at load
    ok(train(&distill_args(m, t, out.to_str().unwrap(), "2")));
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../eesd-core/tests/fixtures/gqa_tied_headdim");
    let q = eesd_core::pretrained::resolve_model_dir(other.to_str().unwrap()).unwrap();
    let cfg = eesd_core::config::LlamaConfig::from_file(&q.join("config.json")).unwrap();
    let w = eesd_core::weights::Weights::open_dir(&q, Kind::Float, Device::Cpu).unwrap();
    let fp = eesd_core::fingerprint::fingerprint(&cfg, &w.shapes().unwrap());
    let other_model = eesd_core::model::Llama::load(cfg, &w).unwrap();
    let err = eesd_core::head::EarlyExitHead::load(&out.join("checkpoint"), &other_model, &fp)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("head was trained for base"), "{err}");
    // NaN loss: training stops, and the last good checkpoint (step 2) is left as it was.
    let good = std::fs::read(out.join("checkpoint/head.safetensors")).unwrap();
    let mut args = distill_args(m, t, out.to_str().unwrap(), "8");
    args.extend(["--resume", "--lr", "1e30", "--clip", "1e38"]);
    clean_error(&train(&args), "loss became");
    assert_eq!(
        std::fs::read(out.join("checkpoint/head.safetensors")).unwrap(),
        good
    );
    let p = Pretrained::load(m, Device::Cpu, Kind::Float).unwrap();
    assert!(eesd_core::head::EarlyExitHead::load(
        &out.join("checkpoint"),
        &p.model,
        &p.fingerprint
    )
    .is_ok());
}

/// `eesd-train` with `args`: (success, stderr).
fn train_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eesd-train"))
        .args(args)
        .output()
        .expect("run eesd-train");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fails with `needle` in the message, no panic and no doubled "error:" prefix.
fn refused(args: &[&str], needle: &str) {
    let (ok, err) = train_cli(args);
    assert!(!ok, "{args:?} succeeded: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks `{needle}`: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("error: error:"),
        "{args:?}: {err}"
    );
}

#[test]
fn nonsense_flags_are_refused_before_any_work() {
    let dir = tmp("flags");
    let m = fixture();
    let m = m.to_str().unwrap();
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let base = [
        "distill",
        "--model",
        m,
        "--data",
        "none.parquet",
        "--out",
        o,
        "--exit-layer",
        "1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (extra, needle) in [
        (
            &["--lr", "NaN"][..],
            "--lr must be a finite number > 0, got NaN",
        ),
        (
            &["--lr", "-0.001"][..],
            "--lr must be a finite number > 0, got -0.001",
        ),
        (&["--accum", "0"][..], "--accum must be at least 1"),
        (&["--steps", "0"][..], "--steps must be at least 1"),
        (&["--max-seq", "1"][..], "--max-seq 1 leaves no room"),
    ] {
        let args = with(extra);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    }
    let gen = |extra: &[&str]| -> Vec<String> {
        ["gen", "--model", m, "--data", "none.parquet", "--out", o]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (extra, needle) in [
        (&["--limit", "0"][..], "--limit 0 takes no prompt"),
        (
            &["--batch-size", "0"][..],
            "--batch-size must be at least 1",
        ),
        (&["--chunk", "0"][..], "--chunk must be at least 1"),
    ] {
        let args = gen(extra);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    }
    // A recipe: a negative number is a value, and a typo in [distill] is reported before
    // [gen] runs (the gen table would fail on its missing corpus if it ran).
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[gen]\nmodel = \"{m}\"\ndata = [\"missing.parquet\"]\nout = \"{o}/t\"\n\n\
             [distill]\nmodel = \"{m}\"\ndata = [\"{o}/t\"]\nout = \"{o}\"\nexit_layer = 1\nlr = -0.001\n"
        ),
    )
    .unwrap();
    refused(
        &["run", recipe.to_str().unwrap()],
        "--lr must be a finite number > 0, got -0.001",
    );
    std::fs::write(
        &recipe,
        format!("[gen]\nmodel = \"{m}\"\ndata = [\"missing.parquet\"]\nout = \"{o}/t\"\n\n[distill]\nmodle = \"x\"\n"),
    )
    .unwrap();
    refused(&["run", recipe.to_str().unwrap()], "[distill]");
    // --model pointing at a file names the folder it wants.
    let cfg = format!("{m}/config.json");
    refused(
        &[
            "distill",
            "--model",
            &cfg,
            "--data",
            "x",
            "--out",
            o,
            "--exit-layer",
            "1",
        ],
        "is a file",
    );
}

#[test]
fn exports_and_runs_are_not_replaced_unasked() {
    let dir = tmp("noclobber");
    let m = fixture();
    let m = m.to_str().unwrap();
    // An export folder holding other files is never replaced (it would delete them) ...
    let shared = dir.join("heads");
    std::fs::create_dir_all(shared.join("other-head")).unwrap();
    std::fs::write(shared.join("notes.txt"), "keep me").unwrap();
    let o = dir.join("run");
    let args = |export: &std::path::Path, extra: &[&str]| -> Vec<String> {
        [
            "distill",
            "--model",
            m,
            "--data",
            "x",
            "--out",
            o.to_str().unwrap(),
            "--exit-layer",
            "1",
            "--export",
            export.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    for extra in [&[][..], &["--force"][..]] {
        let a = args(&shared, extra);
        refused(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            "holds other files",
        );
    }
    assert!(shared.join("notes.txt").is_file() && shared.join("other-head").is_dir());
    // ... and a head there is replaced only with --force.
    let head = dir.join("head");
    std::fs::create_dir_all(&head).unwrap();
    std::fs::write(head.join("head.json"), "{}").unwrap();
    let a = args(&head, &[]);
    refused(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "give --force",
    );
    // A run in --out is continued with --resume or replaced with --force, never silently.
    std::fs::create_dir_all(o.join("checkpoint")).unwrap();
    std::fs::write(o.join("checkpoint/trainer.json"), "{}").unwrap();
    let a: Vec<String> = [
        "distill",
        "--model",
        m,
        "--data",
        "x",
        "--out",
        o.to_str().unwrap(),
        "--exit-layer",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    refused(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "give --resume to continue it",
    );
}

/// Runs eesd-train with stdout closed before it writes anything (`... | head -c 0`): it must
/// end quietly, with success and no panic.
fn quiet_with_closed_stdout(args: &[&str]) {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_eesd-train"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {:?}, {err}", out.status);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{args:?}: {err}"
    );
}

/// `eesd-train ... | head`: every subcommand (gen, distill training and --eval-only, run,
/// and --help) ends quietly when its reader goes, and still does its work.
#[test]
fn every_subcommand_ends_quietly_with_a_closed_stdout() {
    let dir = tmp("closed");
    let m = fixture();
    let ms = m.to_str().unwrap();
    let corpus = corpus_file(&dir, 6);
    let teacher = dir.join("teacher");
    let ts = teacher.to_str().unwrap();
    quiet_with_closed_stdout(&[
        "gen",
        "--model",
        ms,
        "--device",
        "cpu",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        ts,
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(corpus::read_teacher(ts).unwrap().len(), 6);
    let run = dir.join("run");
    let rs = run.to_str().unwrap();
    quiet_with_closed_stdout(&distill_args(ms, ts, rs, "2"));
    assert!(run.join("metrics.jsonl").exists());
    let mut eval = distill_args(ms, ts, rs, "2");
    eval.push("--eval-only");
    quiet_with_closed_stdout(&eval);
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[distill]\nmodel = \"{ms}\"\ndevice = \"cpu\"\ndata = [\"{ts}\"]\nout = \"{}\"\n\
             exit_layer = 1\nsteps = 2\naccum = 2\neval_every = 2\neval_examples = 4\nwarmup = 2\n",
            dir.join("recipe-run").display()
        ),
    )
    .unwrap();
    quiet_with_closed_stdout(&["run", recipe.to_str().unwrap()]);
    assert!(dir.join("recipe-run/metrics.jsonl").exists());
    quiet_with_closed_stdout(&["--help"]);
    quiet_with_closed_stdout(&["distill", "--help"]);
}

/// `--kernels` (which kernels run the frozen base) is checked before any work, in both
/// subcommands: only native or torch, and native only on the CPU.
#[test]
fn kernels_flag_is_checked_before_any_work() {
    let dir = tmp("kernels");
    let m = fixture();
    let ms = m.to_str().unwrap();
    let missing = dir.join("missing.parquet");
    let (data, out) = (missing.to_str().unwrap(), dir.join("o"));
    let os = out.to_str().unwrap();
    for sub in ["gen", "distill"] {
        let mut args = vec![sub, "--model", ms, "--data", data, "--out", os];
        if sub == "distill" {
            args.extend(["--exit-layer", "1"]);
        }
        let with = |extra: &[&'static str]| [&args[..], extra].concat();
        refused(
            &with(&["--device", "cpu", "--kernels", "fast"]),
            "bad --kernels `fast`: expected native or torch",
        );
        refused(
            &with(&["--device", "cuda", "--kernels", "native"]),
            "--kernels native runs on the CPU only",
        );
    }
    assert!(!out.exists(), "a refused command wrote its output");
}
