//! The model's tokenizer (`tokenizer.json`) and its chat template, rendered with minijinja the
//! way transformers renders it (`trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`), so `--chat` prompts are token-identical to
//! `apply_chat_template(..., add_generation_prompt=True)`.

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Ids that end generation: the config's EOS ids plus generation_config's.
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Special tokens in tokenizer_config.json are a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

impl Tokenizer {
    pub fn from_dir(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            match tcfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: the one called "default".
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let mut eos_ids = cfg.eos_token_ids.clone();
        if let Some(g) = read_json(&dir.join("generation_config.json"))? {
            let extra: Vec<u32> = match g.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                None => vec![],
            };
            eos_ids.extend(extra);
        }
        let eos_token = token_text(tcfg.get("eos_token"));
        if eos_ids.is_empty() {
            if let Some(id) = inner.token_to_id(&eos_token) {
                eos_ids.push(id);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: token_text(tcfg.get("bos_token")),
            eos_token,
            eos_ids,
        })
    }

    /// Text -> ids, with the tokenizer's own special-token rules (e.g. LLaMA-2's BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Ids -> text, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages` with the generation prompt appended.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("the model folder has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", src)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }

    /// The chat-formatted ids of a single user turn, as transformers' `apply_chat_template`
    /// with `tokenize=True` produces them (the rendered text is encoded without extra
    /// special tokens: the template writes them itself).
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(&[Message {
            role: "user".into(),
            content: user.into(),
        }])?;
        self.encode(&text, false)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
