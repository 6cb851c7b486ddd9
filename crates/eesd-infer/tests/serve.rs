//! The server in process, through its router (no socket): responses and errors in OpenAI's
//! shapes, streams equal to whole responses, greedy text equal to the engine's alone at
//! concurrency 1, 4 and 8 beside sampled neighbours, 429 when the queue is full, and a
//! dropped stream cancelling its sequence. The tiny fixture model with a random early-exit
//! head (exit layer 1), so every path drafts and verifies.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use eesd_core::head::{EarlyExitHead, HeadInit, HeadSpec};
use eesd_core::pretrained::Pretrained;
use eesd_infer::backends::{Kernels, NativeBackend};
use eesd_infer::controller;
use eesd_infer::engine::{DraftSources, Engine, GenerateOptions};
use eesd_infer::serve::{self, ServeConfig, Server};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Mutex;
use tch::{Device, Kind};
use tower::ServiceExt;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../eesd-core/tests/fixtures/mha_untied")
}

/// The fixture and the same random head every call (seeded), so a reference engine built here
/// runs exactly the server's model.
fn load() -> anyhow::Result<(Pretrained, Option<EarlyExitHead>)> {
    let p = Pretrained::load(fixture().to_str().unwrap(), Device::Cpu, Kind::Float)?;
    tch::manual_seed(42);
    let mut spec = HeadSpec::for_base(&p.model, "test", 1);
    spec.init = HeadInit::Random;
    let head = EarlyExitHead::init(&p.model, spec, None)?;
    Ok((p, Some(head)))
}

const MAX_DRAFT: usize = 4;

fn config(max_batch: usize, max_queue: usize) -> ServeConfig {
    ServeConfig {
        kernels: Kernels::Native,
        max_draft: MAX_DRAFT,
        max_batch,
        max_queue,
        max_body_bytes: 4096,
        controller: None,
        sources: DraftSources::HEAD,
        model_name: "fixture".into(),
        calibrate: false,
    }
}

/// Torch's generator is global and the loader seeds it: one server start at a time.
static START: Mutex<()> = Mutex::new(());

fn server(max_batch: usize, max_queue: usize) -> Server {
    let _g = START.lock().unwrap_or_else(|e| e.into_inner());
    serve::start(config(max_batch, max_queue), load).expect("server starts")
}

async fn send(s: &Server, method: &str, path: &str, body: Body) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let resp = s.router().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

async fn post(s: &Server, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, bytes) = send(s, "POST", path, Body::from(body.to_string())).await;
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// The `data:` payloads of an SSE body, `[DONE]` last.
fn sse_events(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// What the engine alone generates for `prompt` (the server's model, greedy).
fn reference(prompt: &str, max_new: usize, ctrl: &str, sources: DraftSources) -> (String, usize) {
    let _g = START.lock().unwrap_or_else(|e| e.into_inner());
    let (p, head) = load().unwrap();
    let ids = p.tokenizer.encode(prompt, true).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling: Default::default(),
        eos_ids: p.tokenizer.eos_ids.clone(),
    };
    let backend = NativeBackend::new(&p.model, head.as_ref()).unwrap();
    let mut engine = Engine::new(backend, MAX_DRAFT);
    engine.sources = sources;
    let mut c = controller::build(ctrl, true, None, MAX_DRAFT, 0).unwrap();
    let g = engine.generate(&ids, &opts, c.as_mut(), |_| {}).unwrap();
    (p.tokenizer.decode(&g.ids).unwrap(), g.ids.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_metrics_and_unknown_paths() {
    let s = server(4, 8);
    let (st, body) = send(&s, "GET", "/health", Body::empty()).await;
    assert_eq!(
        (st, &body[..]),
        (StatusCode::OK, &br#"{"status":"ok"}"#[..])
    );
    let (st, body) = send(&s, "GET", "/v1/models", Body::empty()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"][0]["id"], "fixture");
    assert_eq!(v["data"][0]["max_model_len"], 128);
    let (st, body) = send(&s, "GET", "/v1/nope", Body::empty()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found_error"))
    );
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "w1 w2", "max_tokens": 3}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (_, body) = send(&s, "GET", "/metrics", Body::empty()).await;
    let text = String::from_utf8(body).unwrap();
    for name in [
        "eesd_requests_total{endpoint=\"completions\",status=\"200\"} 1",
        "eesd_requests_total{endpoint=\"completions\",status=\"400\"}",
        "eesd_prompt_tokens_total",
        "eesd_generation_tokens_total 3",
        "eesd_queue_depth 0",
        "eesd_running_sequences 0",
        "eesd_time_to_first_token_seconds_count 1",
        "eesd_inter_token_latency_seconds_count 2",
        "eesd_drafted_tokens_total{position=\"1\"}",
    ] {
        let present = text.contains(name);
        // No 400 was made yet: that series must not exist.
        assert_eq!(present, !name.contains("400"), "{name} in\n{text}");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_the_field_named() {
    let s = server(2, 8);
    let long = "w1 ".repeat(130);
    let cases: Vec<(&str, Body, Option<&str>, &str)> = vec![
        (
            "/v1/completions",
            Body::from("{\"prompt\": "),
            None,
            "not valid JSON",
        ),
        (
            "/v1/completions",
            Body::from(vec![0xffu8, 0xfe, b'{']),
            None,
            "not UTF-8",
        ),
        (
            "/v1/completions",
            Body::from(format!("{{\"prompt\": \"{}\"}}", "w1 ".repeat(2000))),
            None,
            "limit is 4096 bytes",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": long}).to_string()),
            Some("prompt"),
            "context is 128",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "max_tokens": 500}).to_string()),
            Some("max_tokens"),
            "over the model's context",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "controller": "sometimes"}).to_string()),
            Some("controller"),
            "sometimes",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "draft_sources": "oracle"}).to_string()),
            Some("draft_sources"),
            "oracle",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "controller": "fixed:99"}).to_string()),
            Some("controller"),
            "fixed:99",
        ),
        (
            "/v1/chat/completions",
            Body::from(json!({"messages": [{"role": "tool", "content": "x"}]}).to_string()),
            Some("messages"),
            "tool",
        ),
        (
            "/v1/chat/completions",
            Body::from(json!({"prompt": "w1"}).to_string()),
            Some("messages"),
            "required",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "temperature": -0.5}).to_string()),
            Some("temperature"),
            "[0, 2]",
        ),
        (
            "/v1/completions",
            Body::from(json!({"prompt": "w1", "top_p": 2}).to_string()),
            Some("top_p"),
            "(0, 1]",
        ),
    ];
    for (path, body, param, needle) in cases {
        let (st, bytes) = send(&s, "POST", path, body).await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(st, StatusCode::BAD_REQUEST, "{needle}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle}: {msg}");
        assert_eq!(v["error"]["param"].as_str(), param, "{needle}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_the_whole_response_text() {
    let s = server(4, 8);
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "w3 w9 w4", "max_tokens": 24, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "w3 w9 w4"}], "max_tokens": 24, "temperature": 0}),
        ),
    ] {
        let (st, whole) = post(&s, path, body.clone()).await;
        assert_eq!(st, StatusCode::OK, "{whole}");
        let chat = path.contains("chat");
        let text = if chat {
            whole["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            whole["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert!(!text.is_empty());
        let spec = &whole["speculation"];
        assert!(spec["rounds"].as_u64().unwrap() >= 1, "{whole}");
        assert_eq!(spec["controller"], "thompson");
        let mut sb = body.clone();
        sb["stream"] = true.into();
        sb["stream_options"] = json!({"include_usage": true});
        let (st, bytes) = send(&s, "POST", path, Body::from(sb.to_string())).await;
        assert_eq!(st, StatusCode::OK);
        let evs = sse_events(&bytes);
        assert_eq!(evs.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = evs[..evs.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let mut streamed = String::new();
        for c in &chunks {
            if let Some(choice) = c["choices"].get(0) {
                let piece = if chat {
                    choice["delta"]["content"].as_str()
                } else {
                    choice["text"].as_str()
                };
                streamed.push_str(piece.unwrap_or(""));
            }
        }
        assert_eq!(streamed, text, "{path}");
        if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        }
        let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
        assert_eq!(finish, &whole["choices"][0]["finish_reason"]);
        let usage = &chunks[chunks.len() - 1]["usage"];
        assert_eq!(usage, &whole["usage"], "usage in the last chunk");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let s = server(2, 8);
    let body = json!({"prompt": "w3 w9 w4", "max_tokens": 30, "temperature": 0});
    let (_, whole) = post(&s, "/v1/completions", body.clone()).await;
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(
        words.len() >= 4,
        "the fixture's answer is long enough: {text}"
    );
    let stop = words[3];
    let cut = &text[..text.find(stop).unwrap()];
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop, "never-generated"]);
        b["stream"] = stream.into();
        let (st, bytes) = send(&s, "POST", "/v1/completions", Body::from(b.to_string())).await;
        assert_eq!(st, StatusCode::OK);
        let got = if stream {
            let evs = sse_events(&bytes);
            let mut t = String::new();
            for e in &evs[..evs.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap();
                t.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            }
            t
        } else {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(got, cut, "stream {stream}");
    }
    s.stop();
}

/// A request of the concurrency test: its body and, when greedy, the text it must return.
struct Case {
    body: Value,
    want: Option<String>,
}

fn cases(n: usize) -> Vec<Case> {
    let prompts = ["w3 w9 w4", "w1 w2 w3 w4 w5", "w7", "w2 w2 w8 w1 w6 w6 w3"];
    let controllers = [
        ("thompson", "head"),
        ("off", "head"),
        ("fixed:2", "head"),
        ("thompson", "lookup"),
    ];
    (0..n)
        .map(|i| {
            let prompt = prompts[i % prompts.len()];
            let max = 8 + 7 * (i % 5);
            let (ctrl, src) = controllers[i % controllers.len()];
            if i % 4 == 3 {
                // A sampled neighbour.
                return Case {
                    body: json!({"prompt": prompt, "max_tokens": max, "temperature": 0.8,
                                 "top_p": 0.9, "controller": ctrl}),
                    want: None,
                };
            }
            let sources = DraftSources::parse(src).unwrap();
            let (want, _) = reference(prompt, max, ctrl, sources);
            Case {
                body: json!({"prompt": prompt, "max_tokens": max, "temperature": 0,
                             "controller": ctrl, "draft_sources": src, "stream": i % 2 == 1}),
                want: Some(want),
            }
        })
        .collect()
}

fn text_of(bytes: &[u8], stream: bool) -> String {
    if !stream {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        return v["choices"][0]["text"].as_str().unwrap().to_string();
    }
    let evs = sse_events(bytes);
    let mut t = String::new();
    for e in &evs[..evs.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(c) = v["choices"].get(0) {
            t.push_str(c["text"].as_str().unwrap_or(""));
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_text_is_the_same_at_any_load() {
    let cases = cases(8);
    for concurrency in [1usize, 4, 8] {
        let s = std::sync::Arc::new(server(concurrency, 16));
        let mut tasks = Vec::new();
        for c in cases.iter().take(concurrency.max(4)) {
            let (s, body) = (s.clone(), c.body.clone());
            tasks.push(tokio::spawn(async move {
                let stream = body["stream"].as_bool().unwrap_or(false);
                let (st, bytes) =
                    send(&s, "POST", "/v1/completions", Body::from(body.to_string())).await;
                assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
                text_of(&bytes, stream)
            }));
        }
        for (t, c) in tasks.into_iter().zip(&cases) {
            let got = t.await.unwrap();
            if let Some(want) = &c.want {
                assert_eq!(&got, want, "concurrency {concurrency}: {}", c.body);
            }
        }
        std::sync::Arc::into_inner(s).unwrap().stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    // One slot and one queue place: of many requests at once, some must be refused.
    let s = std::sync::Arc::new(server(1, 1));
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/completions")
                .body(Body::from(
                    json!({"prompt": "w1 w2", "max_tokens": 60, "temperature": 0}).to_string(),
                ))
                .unwrap();
            let resp = s.router().oneshot(req).await.unwrap();
            let retry = resp.headers().get("retry-after").cloned();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, retry, bytes)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry, bytes) = t.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(retry.unwrap(), "1");
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(v["error"]["type"], "rate_limit_error");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    std::sync::Arc::into_inner(s).unwrap().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_its_sequence() {
    let s = server(2, 8);
    // No EOS can end it first: only the cancellation can.
    let body = json!({"prompt": "w1", "max_tokens": 120, "temperature": 0.9, "ignore_eos": true, "stream": true});
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = s.router().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp); // the client goes away before reading
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let mut text = String::new();
    for _ in 0..200 {
        let (_, b) = send(&s, "GET", "/metrics", Body::empty()).await;
        text = String::from_utf8(b).unwrap();
        if metric(&text, "eesd_cancelled_total") == 1.0
            && metric(&text, "eesd_running_sequences") == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&text, "eesd_cancelled_total"), 1.0, "{text}");
    assert_eq!(metric(&text, "eesd_running_sequences"), 0.0, "{text}");
    assert!(
        metric(&text, "eesd_generation_tokens_total") < 120.0,
        "{text}"
    );
    // The server goes on serving.
    let (st, _) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "w1", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    s.stop();
}
