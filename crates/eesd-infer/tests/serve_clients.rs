//! `eesd-infer serve` as a user runs it, on a loopback port, talked to by real clients: curl
//! and the `openai` Python package (from the project venv, which `scripts/setup.sh` makes).
//! The greedy text must equal what `eesd-infer generate` prints for the same prompt; SIGTERM
//! must let a running stream finish with its final event and exit 0. The tiny fixture model,
//! drafts copied from the text (the lookup source needs no head).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> String {
    root()
        .join("crates/eesd-core/tests/fixtures/mha_untied")
        .display()
        .to_string()
}

/// A server on a free port; its address is read from its "listening on" line.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
            .args([
                "serve",
                "--model",
                &fixture(),
                "--device",
                "cpu",
                "--port",
                "0",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start eesd-infer serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let base = loop {
            assert!(Instant::now() < deadline, "no listening line");
            let line = lines
                .next()
                .expect("the server exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Served { child, base }
    }

    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "60"])
            .args(args)
            .output()
            .expect("curl is installed")
    }

    fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the server to exit; its exit status.
    fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// `eesd-infer generate --json`'s text for a prompt (greedy, the same draft sources).
fn generate(prompt: &str, max_new: usize, chat: bool) -> String {
    let model = fixture();
    let n = max_new.to_string();
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--device",
        "cpu",
        "--draft-sources",
        "lookup",
        "--prompt",
        prompt,
        "--max-new-tokens",
        &n,
        "--json",
    ];
    if chat {
        args.push("--chat");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn curl_and_the_openai_client_get_generates_text() {
    let s = Served::start(&["--draft-sources", "lookup"]);
    let url = format!("{}/v1/completions", s.base);
    let body = r#"{"prompt": "w3 w9 w4", "max_tokens": 20, "temperature": 0}"#;
    let out = s.curl(&["-H", "content-type: application/json", "-d", body, &url]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = generate("w3 w9 w4", 20, false);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want, "{v}");
    assert_eq!(v["speculation"]["draft_sources"], "lookup");

    let sbody = r#"{"prompt": "w3 w9 w4", "max_tokens": 20, "temperature": 0, "stream": true}"#;
    let out = s.curl(&["-N", "-d", sbody, &url]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let out = s.curl(&["-i", "-d", r#"{"prompt": 1}"#, &url]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"param\":\"prompt\""), "{text}");

    let python = root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (just test does)",
        python.display()
    );
    let script = root().join("crates/eesd-infer/tests/clients/openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&s.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["completion"].as_str().unwrap(), want);
    assert_eq!(v["chat"].as_str().unwrap(), generate("w5 w6 w7", 16, true));
    assert!(v["error"].as_str().unwrap().contains("max_tokens"));
    s.sigterm();
    assert!(s.wait().success());
}

#[test]
fn sigterm_lets_the_running_stream_finish_and_exits_0() {
    let s = Served::start(&["--draft-sources", "lookup"]);
    let url = format!("{}/v1/completions", s.base);
    let body = r#"{"prompt": "w1 w2", "max_tokens": 100, "temperature": 0.7, "stream": true}"#;
    let curl = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", "-d", body, &url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The request is in flight (its first event has been written) before the signal.
    std::thread::sleep(Duration::from_millis(300));
    s.sigterm();
    let out = curl.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":"), "{text}");
    let base = s.base.clone();
    assert!(s.wait().success(), "exit status 0 after SIGTERM");
    // Nothing listens any more.
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("{base}/health")])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn bad_flags_fail_before_the_model_loads() {
    let out = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
        .args(["serve", "--model", "/nonexistent", "--max-batch", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--max-batch"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_eesd-infer"))
        .args(["serve", "--model", &fixture(), "--controller", "thompson"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--head"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
