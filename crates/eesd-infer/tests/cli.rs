//! The CLI end to end on the tiny fixture model (word-level tokenizer, 128-token context):
//! output contract of `--json`, and a clear error with non-zero exit for each bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../eesd-core/tests/fixtures/mha_untied")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
        .args(args)
        .output()
        .expect("run eesd-infer")
}

/// Fails with exit code != 0, a message containing `needle`, and no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eesd-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model() -> String {
    fixture().display().to_string()
}

#[test]
fn json_output_has_the_contract_fields() {
    let m = model();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--device",
        "cpu",
        "--prompt",
        "w5 w6 w7",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for k in ["id", "text", "prompt_ids", "ids", "stats"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    for k in [
        "prompt_tokens",
        "new_tokens",
        "decode_seconds",
        "decode_tokens_per_s",
    ] {
        assert!(v["stats"][k].is_number(), "stats.{k}: {v}");
    }
    assert_eq!(v["prompt_ids"], serde_json::json!([5, 6, 7]));
    let n = v["ids"].as_array().unwrap().len();
    assert!((1..=5).contains(&n) && v["stats"]["new_tokens"] == n);
}

#[test]
fn chat_and_prompt_file_and_sampling() {
    let d = tmpdir("pf");
    let f = d.join("p.jsonl");
    std::fs::write(
        &f,
        "{\"id\": \"a\", \"prompt\": \"w9 w10\"}\n{\"id\": \"b\", \"prompt\": \"w11\"}\n",
    )
    .unwrap();
    let (m, fp) = (model(), f.display().to_string());
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt-file",
        &fp,
        "--chat",
        "--max-new-tokens",
        "4",
        "--json",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
    ];
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], "a");
    // `<s> user w9 w10 </s> <s> assistant` from the fixture's chat template.
    assert_eq!(
        lines[0]["prompt_ids"],
        serde_json::json!([1, 3, 9, 10, 2, 1, 4])
    );
    // Same seed, same sample.
    let ids = |o: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ids"].clone())
            .collect()
    };
    assert_eq!(ids(&run(&args)), ids(&out));
}

#[test]
fn missing_model_folder() {
    let out = run(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "w5",
    ]);
    assert_clean_error(&out, "model folder not found");
}

#[test]
fn offline_hub_id_not_in_cache() {
    let out = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
        .args([
            "generate",
            "--model",
            "nobody/no-such-model",
            "--prompt",
            "w5",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmpdir("hf"))
        .output()
        .unwrap();
    assert_clean_error(&out, "HF_HUB_OFFLINE");
}

fn copy_fixture(tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    for e in std::fs::read_dir(fixture()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    d
}

#[test]
fn truncated_safetensors() {
    let d = copy_fixture("trunc");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "w5"]);
    assert_clean_error(&out, "invalid safetensors file");
}

#[test]
fn corrupt_safetensors_header() {
    let d = copy_fixture("corrupt");
    let f = d.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    for b in bytes.iter_mut().skip(8).take(16) {
        *b = b'#';
    }
    std::fs::write(&f, &bytes).unwrap();
    let out = run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "w5"]);
    assert_clean_error(&out, "invalid safetensors file");
}

#[test]
fn wrong_dtype_flag() {
    let m = model();
    assert_clean_error(
        &run(&[
            "generate", "--model", &m, "--prompt", "w5", "--dtype", "int8",
        ]),
        "bad dtype `int8`",
    );
}

#[test]
fn wrong_device_flag() {
    let m = model();
    assert_clean_error(
        &run(&[
            "generate", "--model", &m, "--prompt", "w5", "--device", "tpu",
        ]),
        "bad device",
    );
}

#[test]
fn empty_prompt() {
    let m = model();
    assert_clean_error(
        &run(&["generate", "--model", &m, "--prompt", "  "]),
        "empty",
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let m = model();
    let long: Vec<String> = (0..200).map(|i| format!("w{}", 5 + i % 100)).collect();
    let out = run(&["generate", "--model", &m, "--prompt", &long.join(" ")]);
    assert_clean_error(&out, "context is 128");
}

#[test]
fn generation_stops_cleanly_at_the_context_limit() {
    let m = model();
    let prompt: Vec<String> = (0..120).map(|i| format!("w{}", 5 + i % 100)).collect();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        &prompt.join(" "),
        "--max-new-tokens",
        "50",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v["ids"].as_array().unwrap().len();
    // Stops at EOS or at the context end: never beyond 128 positions.
    assert!(120 + n <= 128, "{n} new tokens after 120");
    if v["stats"]["stop_reason"] != "eos" {
        assert_eq!(v["stats"]["stop_reason"], "context_full");
    }
}

#[test]
fn bad_sampling_values() {
    let m = model();
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--temperature",
            "-1",
        ]),
        "temperature must be a finite number >= 0",
    );
    assert_clean_error(
        &run(&["generate", "--model", &m, "--prompt", "w5", "--top-p", "0"]),
        "top-p must be in (0, 1]",
    );
    assert_clean_error(
        &run(&[
            "generate", "--model", &m, "--prompt", "w5", "--top-p", "1.5",
        ]),
        "top-p must be in (0, 1]",
    );
}

#[test]
fn missing_prompt_file() {
    let m = model();
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt-file",
            "/nonexistent.jsonl",
        ]),
        "cannot read prompt file",
    );
}

#[test]
fn speculative_flags_are_checked() {
    let m = model();
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--controller",
            "best",
        ]),
        "unknown controller `best`",
    );
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--controller",
            "fixed:0",
        ]),
        "K >= 1",
    );
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--max-draft",
            "0",
            "--controller",
            "thompson",
        ]),
        "at least 1",
    );
    // A draft length that cannot pay is refused before any model work (it used to calibrate
    // 1,000 verify widths first).
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--max-draft",
            "1000",
            "--controller",
            "thompson",
        ]),
        "at most 16",
    );
    assert_clean_error(
        &run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--controller",
            "thompson",
        ]),
        "give --head",
    );
    for (sources, needle) in [
        ("heads", "unknown draft source `heads`"),
        ("", "--draft-sources is empty"),
        ("head,lookup", "the head source needs --head"),
    ] {
        let out = run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "w5",
            "--draft-sources",
            sources,
        ]);
        assert_clean_error(&out, needle);
    }
}

/// Copied drafts need no head: `--draft-sources lookup` drafts from the prompt, and the
/// output is plain decoding's.
#[test]
fn lookup_drafts_without_a_head_give_plain_output() {
    let m = model();
    let prompt = "w5 w6 w7 w8 w9 w5 w6 w7 w8 w9 w5 w6 w7";
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let plain = gen(&[]);
    let copied = gen(&["--draft-sources", "lookup"]);
    assert_eq!(plain["ids"], copied["ids"]);
    assert_eq!(plain["stats"]["drafted"], 0);
    assert_eq!(copied["stats"]["controller"], "thompson");
    assert_eq!(copied["stats"]["draft_sources"], "lookup");
    assert!(
        copied["stats"]["copied_rounds"].as_u64().unwrap() > 0,
        "{copied}"
    );
}

#[test]
fn a_head_for_another_model_is_refused() {
    use eesd_core::head::{EarlyExitHead, HeadSpec};
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../eesd-core/tests/fixtures/gqa_tied_headdim");
    // The gqa fixture has no tokenizer: build its model and fingerprint directly.
    let cfg = eesd_core::config::LlamaConfig::from_file(&other.join("config.json")).unwrap();
    let w =
        eesd_core::weights::Weights::open_dir(&other, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let fp = eesd_core::fingerprint::fingerprint(&cfg, &w.shapes().unwrap());
    let base = eesd_core::model::Llama::load(cfg, &w).unwrap();
    let head = EarlyExitHead::init(&base, HeadSpec::for_base(&base, &fp, 1), None).unwrap();
    let dir = tmpdir("otherhead").join("head");
    head.save(&dir).unwrap();
    let m = model();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5",
        "--head",
        dir.to_str().unwrap(),
    ]);
    assert_clean_error(&out, "head was trained for");
}

#[test]
fn speculative_json_stats_have_the_contract_fields() {
    use eesd_core::head::{EarlyExitHead, HeadSpec};
    let p = eesd_core::pretrained::Pretrained::load(&model(), tch::Device::Cpu, tch::Kind::Float)
        .unwrap();
    let head = EarlyExitHead::init(
        &p.model,
        HeadSpec::for_base(&p.model, &p.fingerprint, 1),
        None,
    )
    .unwrap();
    let dir = tmpdir("head").join("head");
    head.save(&dir).unwrap();
    let m = model();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5 w6",
        "--head",
        dir.to_str().unwrap(),
        "--controller",
        "fixed:2",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "rounds",
        "drafted",
        "accepted",
        "acceptance_rate",
        "mean_accepted_length",
        "mean_draft_length",
    ] {
        assert!(v["stats"][k].is_number(), "stats.{k}: {v}");
    }
    assert!(v["stats"]["accepted_by_position"].is_array());
    assert!(v["stats"]["drafted"].as_u64().unwrap() > 0);
}

/// A head saved for the fixture model, with its norm weights replaced by `fill`.
fn head_dir(tag: &str, fill: Option<f64>) -> PathBuf {
    use eesd_core::head::{EarlyExitHead, HeadSpec};
    let p = eesd_core::pretrained::Pretrained::load(&model(), tch::Device::Cpu, tch::Kind::Float)
        .unwrap();
    let mut head = EarlyExitHead::init(
        &p.model,
        HeadSpec::for_base(&p.model, &p.fingerprint, 1),
        None,
    )
    .unwrap();
    if let Some(v) = fill {
        let _ = head.norm.weight.fill_(v);
    }
    let dir = tmpdir(tag).join("head");
    head.save(&dir).unwrap();
    dir
}

#[test]
fn a_nan_head_is_an_error_when_sampling() {
    let m = model();
    let dir = head_dir("nanhead", Some(f64::NAN));
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5 w6",
        "--head",
        dir.to_str().unwrap(),
        "--controller",
        "fixed:2",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.8",
    ]);
    assert_clean_error(
        &out,
        "the head's draft distribution is not a probability distribution",
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("C++"),
        "no torch stack"
    );
}

/// Runs `args` with stdout closed before the command writes anything (`... | head -c 0`):
/// it must end quietly, with success and no panic.
fn assert_quiet_with_closed_stdout(args: &[&str]) {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
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

/// `generate | head -c 20` and the like: every subcommand ends quietly when its reader goes.
#[test]
fn every_subcommand_ends_quietly_with_a_closed_stdout() {
    let m = model();
    let dir = tmpdir("closed");
    let prompts = dir.join("p.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"w5 w6\"}\n").unwrap();
    let corpus = dir.join("c.parquet");
    eesd_core::corpus::write_prompts(&corpus, &[("a", "w5 w6")]).unwrap();
    let head = head_dir("closedhead", None);
    let (p, c, h) = (
        prompts.to_str().unwrap(),
        corpus.to_str().unwrap(),
        head.to_str().unwrap(),
    );
    let out = dir.join("bench");
    let gen = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5 w6",
        "--max-new-tokens",
        "40",
    ];
    assert_quiet_with_closed_stdout(&gen);
    assert_quiet_with_closed_stdout(&[&gen[..], &["--json"]].concat());
    assert_quiet_with_closed_stdout(&[
        "bench",
        "--model",
        &m,
        "--head",
        h,
        "--data",
        c,
        "--controllers",
        "off,fixed:1",
        "--num-prompts",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_quiet_with_closed_stdout(&[
        "bench-decode",
        "--model",
        &m,
        "--prompt-file",
        p,
        "--num-prompts",
        "1",
        "--max-new-tokens",
        "4",
    ]);
    assert_quiet_with_closed_stdout(&[
        "bench-kernels",
        "--dtypes",
        "f32",
        "--rows",
        "1",
        "--reps",
        "1",
        "--context",
        "8",
    ]);
}

#[test]
fn bench_refuses_nonsense_before_any_work() {
    let m = model();
    let dir = head_dir("benchargs", None);
    let h = dir.to_str().unwrap();
    let data = tmpdir("benchdata");
    let corpus = data.join("c.parquet");
    // A tiny corpus: two prompts of 2 and 6 words.
    eesd_core::corpus::write_prompts(&corpus, &[("a", "w5 w6"), ("b", "w5 w6 w7 w8 w9 w10")])
        .unwrap();
    let c = corpus.to_str().unwrap();
    let out_dir = data.join("out");
    let o = out_dir.to_str().unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--model", &m, "--head", h, "--data", c, "--out", o];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_clean_error(
        &bench(&["--num-prompts", "0"]),
        "--num-prompts must be at least 1",
    );
    assert_clean_error(
        &bench(&["--controllers", "off,fixed:1,fixed:1"]),
        "lists `fixed:1` twice",
    );
    assert_clean_error(
        &bench(&["--controllers", "off,fixed:1@heads"]),
        "unknown draft source `heads`",
    );
    assert_clean_error(
        &bench(&["--max-prompt-tokens", "1"]),
        "fits --max-prompt-tokens 1",
    );
    // A run writes its report; a second one into the same folder needs --force.
    let ok = bench(&[
        "--controllers",
        "off,fixed:1,thompson@lookup,thompson@head+lookup",
        "--num-prompts",
        "1",
        "--max-new-tokens",
        "4",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out_dir.join("bench.json").is_file());
    assert_clean_error(&bench(&["--controllers", "off,fixed:1"]), "give --force");
    let again = bench(&[
        "--controllers",
        "off,fixed:1",
        "--num-prompts",
        "1",
        "--max-new-tokens",
        "4",
        "--force",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// `fixed:8` with the default `--max-draft 8` is fine even when few tokens are asked for (the
/// engine then drafts fewer); the error named a limit the user never set.
#[test]
fn a_fixed_length_within_max_draft_is_accepted_for_short_generations() {
    let m = model();
    let dir = head_dir("fixed8", None);
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5 w6",
        "--head",
        dir.to_str().unwrap(),
        "--controller",
        "fixed:8",
        "--max-new-tokens",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config that uses fewer layers than the checkpoint holds is refused, naming the flag that
/// loads it anyway.
#[test]
fn a_config_that_leaves_tensors_unused_is_refused() {
    let dir = tmpdir("unused").join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    cfg["num_hidden_layers"] = (layers - 1).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let d = dir.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        d,
        "--prompt",
        "w5 w6",
        "--max-new-tokens",
        "2",
    ];
    assert_clean_error(&run(&args), "--allow-unused-tensors");
    let ok = run(&[&args[..], &["--allow-unused-tensors"]].concat());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// A `--head` that is no head folder is refused before the model loads (the message comes
/// without the model's load line on stderr).
#[test]
fn a_missing_head_is_refused_before_the_model_loads() {
    let m = model();
    let out = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "w5",
        "--head",
        "/nonexistent/head",
    ]);
    assert_clean_error(&out, "expected a head folder holding head.json");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("layers, hidden"),
        "the model was loaded first"
    );
}
