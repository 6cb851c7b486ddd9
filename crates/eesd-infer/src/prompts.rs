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
/// of the decoded ids, holding back an incomplete UTF-8 tail (decoded as U+FFFD).
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    printed: String,
    on: bool,
}

impl<'t> TextStream<'t> {
    /// A stream that prints only when `on` (off for `--json`).
    pub fn new(tokenizer: &'t Tokenizer, on: bool) -> Self {
        TextStream {
            tokenizer,
            printed: String::new(),
            on,
        }
    }

    /// The generated ids so far.
    pub fn push(&mut self, ids: &[u32]) {
        if !self.on {
            return;
        }
        if let Ok(text) = self.tokenizer.decode(ids) {
            if text.len() > self.printed.len()
                && text.starts_with(&self.printed)
                && !text.ends_with('\u{FFFD}')
            {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&text.as_bytes()[self.printed.len()..]);
                let _ = out.flush();
                self.printed = text;
            }
        }
    }

    /// The final text: whatever was held back, then a newline.
    pub fn finish(&mut self, text: &str) {
        if text.len() > self.printed.len() && text.starts_with(&self.printed) {
            print!("{}", &text[self.printed.len()..]);
        }
        println!();
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
    }
}
