//! The OpenAI-compatible request side: each body is read as JSON by hand, field by field, so
//! every malformed request gets a 400 that names the field (`param`) and says what was wrong,
//! in OpenAI's error shape, before any work is queued.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An error response in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            retry_after: None,
        }
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "invalid_request_error",
            404 => "not_found_error",
            405 => "invalid_request_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The JSON body (also the `error` event of a stream that fails after it started).
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }
}

/// One chat message, its content flattened to text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What a request asks for: a prompt (text, or messages for the chat template) and how to
/// decode it. Limits against the model (context, vocabulary) are checked once it is tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub prompt: PromptInput,
    /// `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Extensions: keep generating past EOS (llama.cpp's and vLLM's `ignore_eos`, for
    /// fixed-length benchmarks), the draft controller and the draft sources.
    pub ignore_eos: bool,
    pub controller: Option<String>,
    pub draft_sources: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// The longest stop string (in bytes).
const MAX_STOP_BYTES: usize = 256;

/// Reads a request body: UTF-8, one JSON object, every known field of the right type and in
/// range. Unknown fields are ignored, as clients send fields this server does not use.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> ApiResult<Parsed> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(None, "the request body is empty"));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    };
    let prompt = match endpoint {
        Endpoint::Completions => PromptInput::Text(completion_prompt(&o)?),
        Endpoint::Chat => PromptInput::Messages(messages(&o)?),
    };
    let max_tokens = match endpoint {
        // Chat clients send max_completion_tokens now; max_tokens is its older name.
        Endpoint::Chat if o.contains_key("max_completion_tokens") => {
            opt_count(&o, "max_completion_tokens")?
        }
        _ => opt_count(&o, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            "max_tokens must be at least 1",
        ));
    }
    let temperature = opt_number(&o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = opt_number(&o, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    if let Some(n) = opt_count(&o, "n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
    }
    let seed = opt(&o, "seed", "an integer", |v| v.as_i64().map(|s| s as u64))?;
    let stream = opt_bool(&o, "stream")?.unwrap_or(false);
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    "stream_options is only allowed with stream: true",
                ));
            }
            opt_bool(so, "include_usage")?.unwrap_or(false)
        }
        Some(v) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                format!("stream_options must be an object, got {v}"),
            ))
        }
    };
    Ok(Parsed {
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop: stops(&o)?,
        stream,
        include_usage,
        ignore_eos: opt_bool(&o, "ignore_eos")?.unwrap_or(false),
        controller: opt_string(&o, "controller")?,
        draft_sources: opt_string(&o, "draft_sources")?,
    })
}

fn completion_prompt(o: &Map<String, Value>) -> ApiResult<String> {
    let p = Some("prompt");
    let text = match o.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::invalid(p, "prompt is required")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                p,
                format!(
                    "one prompt per request (got {}): send the others as requests of their own",
                    a.len()
                ),
            ))
        }
        Some(v) => {
            return Err(ApiError::invalid(
                p,
                format!("prompt must be a string, got {}", type_name(v)),
            ))
        }
    };
    if text.trim().is_empty() {
        return Err(ApiError::invalid(p, "prompt is empty"));
    }
    Ok(text)
}

fn messages(o: &Map<String, Value>) -> ApiResult<Vec<ChatMessage>> {
    let p = Some("messages");
    let list = match o.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::invalid(p, "messages is required")),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::invalid(
                p,
                format!("messages must be an array, got {}", type_name(v)),
            ))
        }
    };
    if list.is_empty() {
        return Err(ApiError::invalid(p, "messages is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::invalid(
                p,
                format!("messages[{i}] must be an object"),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(v) => {
                return Err(ApiError::invalid(
                    p,
                    format!("messages[{i}].role must be a string, got {}", type_name(v)),
                ))
            }
            None => return Err(ApiError::invalid(p, format!("messages[{i}] has no role"))),
        };
        // OpenAI's "developer" role is its newer name for "system".
        let role = match role.as_str() {
            "system" | "user" | "assistant" => role,
            "developer" => "system".into(),
            r => {
                return Err(ApiError::invalid(
                    p,
                    format!(
                        "messages[{i}].role `{r}` is not one of system, developer, user, assistant"
                    ),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                p,
                                format!(
                                    "messages[{i}].content[{j}]: only text parts \
                                     ({{\"type\": \"text\", \"text\": ...}}) are supported"
                                ),
                            ))
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    p,
                    format!("messages[{i}] has no content"),
                ))
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    p,
                    format!(
                        "messages[{i}].content must be a string or text parts, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        out.push(ChatMessage { role, content });
    }
    if out.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::invalid(p, "every message is empty"));
    }
    Ok(out)
}

fn stops(o: &Map<String, Value>) -> ApiResult<Vec<String>> {
    let p = Some("stop");
    let list = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(p, format!("stop must hold strings, got {}", type_name(v)))
                })
            })
            .collect::<ApiResult<_>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                p,
                format!(
                    "stop must be a string or an array of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            p,
            format!("at most {MAX_STOPS} stop strings, got {}", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(p, "a stop string is empty"));
    }
    if list.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            p,
            format!("a stop string is over {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(list)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field `key` as `get` reads it (`what` names the JSON type it wants); absent or null is
/// `None`, anything else that `get` refuses is a 400 naming the field.
fn opt<T>(
    o: &Map<String, Value>,
    key: &'static str,
    what: &str,
    get: impl Fn(&Value) -> Option<T>,
) -> ApiResult<Option<T>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v).map(Some).ok_or_else(|| {
            let got = match v {
                Value::Number(n) => format!("{n}"),
                v => type_name(v).to_string(),
            };
            ApiError::invalid(Some(key), format!("{key} must be {what}, got {got}"))
        }),
    }
}

fn opt_number(o: &Map<String, Value>, key: &'static str) -> ApiResult<Option<f64>> {
    opt(o, key, "a number", Value::as_f64)
}

fn opt_count(o: &Map<String, Value>, key: &'static str) -> ApiResult<Option<usize>> {
    opt(o, key, "a non-negative integer", |v| {
        v.as_u64().map(|c| usize::try_from(c).unwrap_or(usize::MAX))
    })
}

fn opt_bool(o: &Map<String, Value>, key: &'static str) -> ApiResult<Option<bool>> {
    opt(o, key, "a boolean", Value::as_bool)
}

fn opt_string(o: &Map<String, Value>, key: &'static str) -> ApiResult<Option<String>> {
    opt(o, key, "a string", |v| v.as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoint: Endpoint, body: &str) -> ApiError {
        parse(endpoint, body.as_bytes()).expect_err(body)
    }

    #[test]
    fn a_minimal_request_takes_the_defaults() {
        let p = parse(Endpoint::Completions, br#"{"prompt": "hi"}"#).unwrap();
        assert_eq!(p.prompt, PromptInput::Text("hi".into()));
        assert_eq!((p.max_tokens, p.temperature, p.top_p), (None, 1.0, 1.0));
        assert!(!p.stream && p.stop.is_empty());
        let p = parse(
            Endpoint::Chat,
            br#"{"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                 {"role": "user", "content": "b"}], "max_completion_tokens": 5, "stop": "x",
                 "stream": true, "stream_options": {"include_usage": true}, "seed": 3,
                 "controller": "off", "unknown_field": [1, 2]}"#,
        )
        .unwrap();
        let PromptInput::Messages(m) = &p.prompt else {
            panic!("messages")
        };
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", "a"));
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!((p.seed, p.controller.as_deref()), (Some(3), Some("off")));
    }

    #[test]
    fn each_malformed_request_names_its_fault() {
        use Endpoint::{Chat, Completions};
        let cases: &[(Endpoint, &str, Option<&str>, &str)] = &[
            (Completions, r#"{"prompt": "hi""#, None, "not valid JSON"),
            (Completions, "", None, "empty"),
            (Completions, "[1, 2]", None, "JSON object"),
            (Completions, "{}", Some("prompt"), "required"),
            (Completions, r#"{"prompt": 5}"#, Some("prompt"), "a number"),
            (
                Completions,
                r#"{"prompt": ["a", "b"]}"#,
                Some("prompt"),
                "one prompt",
            ),
            (Completions, r#"{"prompt": "  "}"#, Some("prompt"), "empty"),
            (Chat, "{}", Some("messages"), "required"),
            (Chat, r#"{"messages": []}"#, Some("messages"), "empty"),
            (Chat, r#"{"messages": "hi"}"#, Some("messages"), "array"),
            (
                Chat,
                r#"{"messages": [{"content": "a"}]}"#,
                Some("messages"),
                "no role",
            ),
            (
                Chat,
                r#"{"messages": [{"role": "robot", "content": "a"}]}"#,
                Some("messages"),
                "robot",
            ),
            (
                Chat,
                r#"{"messages": [{"role": "user"}]}"#,
                Some("messages"),
                "no content",
            ),
            (
                Chat,
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                Some("messages"),
                "text parts",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": 0}"#,
                Some("max_tokens"),
                "at least 1",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": -3}"#,
                Some("max_tokens"),
                "non-negative",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": "9"}"#,
                Some("max_tokens"),
                "integer",
            ),
            (
                Completions,
                r#"{"prompt": "a", "temperature": -1}"#,
                Some("temperature"),
                "[0, 2]",
            ),
            (
                Completions,
                r#"{"prompt": "a", "temperature": "hot"}"#,
                Some("temperature"),
                "number",
            ),
            (
                Completions,
                r#"{"prompt": "a", "top_p": 0}"#,
                Some("top_p"),
                "(0, 1]",
            ),
            (
                Completions,
                r#"{"prompt": "a", "top_p": 1.5}"#,
                Some("top_p"),
                "(0, 1]",
            ),
            (
                Completions,
                r#"{"prompt": "a", "n": 2}"#,
                Some("n"),
                "n must be 1",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stream": "yes"}"#,
                Some("stream"),
                "boolean",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stream_options": {"include_usage": true}}"#,
                Some("stream_options"),
                "stream: true",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": ["a", 1]}"#,
                Some("stop"),
                "strings",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": ["a","b","c","d","e"]}"#,
                Some("stop"),
                "at most 4",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": ""}"#,
                Some("stop"),
                "empty",
            ),
            (
                Completions,
                r#"{"prompt": "a", "seed": 1.5}"#,
                Some("seed"),
                "integer",
            ),
            (
                Completions,
                r#"{"prompt": "a", "controller": 3}"#,
                Some("controller"),
                "string",
            ),
        ];
        for (endpoint, body, param, needle) in cases {
            let e = err(*endpoint, body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, *param, "{body}: {}", e.message);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            let b = e.body();
            assert_eq!(b["error"]["type"], "invalid_request_error");
        }
        let e = parse(Completions, b"{\"prompt\": \"\xff\xfe\"}").unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{}", e.message);
    }
}
