//! Prompts from the command line or a file: JSONL with `id` and `prompt`, or plain text
//! (one prompt per non-empty line); and the generated text streamed back.

use anyhow::{bail, Context, Result};
use eesd_core::tokenizer::Tokenizer;
use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub text: String,
}

/// Reads `path`: lines starting with `{` are JSON objects with a string `prompt` and an
/// optional `id` (string or number; default: the line number); others are prompts as they are.
pub fn read_prompt_file(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    parse_prompts(&text, path)
}

/// [`read_prompt_file`] over the file's text (`path` names it in errors).
pub fn parse_prompts(text: &str, path: &Path) -> Result<Vec<Prompt>> {
    // A UTF-8 byte-order mark (editors on Windows write one) is not part of the first line.
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(trimmed)
                .with_context(|| format!("{}:{line_no}: not valid JSON", path.display()))?;
            let Some(prompt) = v.get("prompt").and_then(|p| p.as_str()) else {
                bail!(
                    "{}:{line_no}: expected a string field `prompt`",
                    path.display()
                );
            };
            let id = match v.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => line_no.to_string(),
            };
            out.push(Prompt {
                id,
                text: prompt.to_string(),
            });
        } else {
            out.push(Prompt {
                id: line_no.to_string(),
                text: line.to_string(),
            });
        }
    }
    if out.is_empty() {
        bail!("prompt file {} holds no prompts", path.display());
    }
    Ok(out)
}

/// Streams a generation's text to stdout as tokens arrive: each call prints the new suffix
/// of the decoded ids, holding back an incomplete UTF-8 tail (decoded as U+FFFD). A failed
/// write (a closed pipe) stops the stream; [`TextStream::finish`] reports it.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    printed: String,
    on: bool,
    error: Option<std::io::Error>,
}

impl<'t> TextStream<'t> {
    /// A stream that prints only when `on` (off for `--json`).
    pub fn new(tokenizer: &'t Tokenizer, on: bool) -> Self {
        TextStream {
            tokenizer,
            printed: String::new(),
            on,
            error: None,
        }
    }

    /// The generated ids so far.
    pub fn push(&mut self, ids: &[u32]) {
        if !self.on || self.error.is_some() {
            return;
        }
        if let Ok(text) = self.tokenizer.decode(ids) {
            if text.len() > self.printed.len()
                && text.starts_with(&self.printed)
                && !text.ends_with('\u{FFFD}')
            {
                let mut out = std::io::stdout().lock();
                let wrote = out
                    .write_all(&text.as_bytes()[self.printed.len()..])
                    .and_then(|()| out.flush());
                match wrote {
                    Ok(()) => self.printed = text,
                    Err(e) => self.error = Some(e),
                }
            }
        }
    }

    /// The final text: whatever was held back, then a newline; or the write error that
    /// stopped the stream.
    pub fn finish(&mut self, text: &str) -> std::io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut out = std::io::stdout().lock();
        if text.len() > self.printed.len() && text.starts_with(&self.printed) {
            out.write_all(&text.as_bytes()[self.printed.len()..])?;
        }
        writeln!(out)?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_plain_lines() {
        let dir = std::env::temp_dir().join(format!("eesd-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.jsonl");
        std::fs::write(
            &f,
            "{\"id\": \"a\", \"prompt\": \"hi\"}\n\nplain text\n{\"id\": 7, \"prompt\": \"x\"}\n",
        )
        .unwrap();
        let p = read_prompt_file(&f).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0],
            Prompt {
                id: "a".into(),
                text: "hi".into()
            }
        );
        assert_eq!(
            p[1],
            Prompt {
                id: "3".into(),
                text: "plain text".into()
            }
        );
        assert_eq!(p[2].id, "7");
        std::fs::write(&f, "{\"id\": 1}\n").unwrap();
        assert!(read_prompt_file(&f)
            .unwrap_err()
            .to_string()
            .contains("prompt"));
        std::fs::write(&f, "\n\n").unwrap();
        assert!(read_prompt_file(&f).is_err());
        // A byte-order mark does not turn the first JSON record into a plain-text prompt.
        std::fs::write(&f, "\u{FEFF}{\"id\": \"a\", \"prompt\": \"hi\"}\n").unwrap();
        let p = read_prompt_file(&f).unwrap();
        assert_eq!((p[0].id.as_str(), p[0].text.as_str()), ("a", "hi"));
    }
}
