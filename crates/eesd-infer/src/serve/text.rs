//! Generated ids to streamed text: what is safe to send after each round, and where a stop
//! string ends the answer.
//!
//! The whole answer is decoded again after each round (a few hundred tokens: microseconds),
//! so a character split over tokens is never sent half-made (the decoder writes U+FFFD for it
//! until its last byte arrives), and text that could still become a stop string is held back
//! until it cannot. A stop string is not part of the answer (as in OpenAI's API).

use eesd_core::tokenizer::Tokenizer;

pub struct TextStream {
    ids: Vec<u32>,
    stops: Vec<String>,
    /// The text sent so far (a prefix of every later decode, or the stream holds back).
    sent: String,
    /// The answer ended at a stop string: its text is final.
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            ids: Vec::new(),
            stops,
            sent: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has ended the answer.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Ids generated so far (all of them, past a stop string too).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text the client has so far.
    pub fn text(&self) -> &str {
        &self.sent
    }

    /// Adds a round's ids; returns the text that may be sent now (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, new: &[u32]) -> eesd_core::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.extend_from_slice(new);
        let text = tok.decode(&self.ids)?;
        Ok(self.advance(&text, false))
    }

    /// The generation ended: everything not yet sent (up to a stop string).
    pub fn finish(&mut self, tok: &Tokenizer) -> eesd_core::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = tok.decode(&self.ids)?;
        Ok(self.advance(&text, true))
    }

    /// `text`: the decode of every id so far. Sends up to the first stop string, or else up
    /// to what could still be a stop string's start (or an unfinished character).
    fn advance(&mut self, text: &str, last: bool) -> String {
        if !text.starts_with(&self.sent) {
            // The decoder rewrote text already sent (it can merge spaces around a new token);
            // wait for a decode that extends it again.
            return String::new();
        }
        // A stop string may begin inside text already sent (it was held back only while it
        // could still match), so the search starts before the sent end.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.len().saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        let end = match hit {
            Some(i) => {
                self.stopped = true;
                i.max(self.sent.len())
            }
            None if last => text.len(),
            None => self.safe_end(text),
        };
        if end <= self.sent.len() {
            return String::new();
        }
        let delta = text[self.sent.len()..end].to_string();
        self.sent.push_str(&delta);
        delta
    }

    /// The end of what can be sent while more tokens may come: before a trailing U+FFFD (a
    /// character still missing bytes) and before the longest tail that starts a stop string.
    fn safe_end(&self, text: &str) -> usize {
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end = text.trim_end_matches('\u{FFFD}').len();
        }
        let head = &text[..end];
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if head.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        (end - hold).max(self.sent.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `advance` over successive decodes, collecting what is sent.
    fn run(stops: &[&str], decodes: &[&str]) -> (String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for (i, d) in decodes.iter().enumerate() {
            out.push_str(&s.advance(d, i + 1 == decodes.len()));
            assert_eq!(out, s.text());
        }
        (out, s.stopped())
    }

    #[test]
    fn stop_strings_end_the_text_and_are_not_sent() {
        assert_eq!(
            run(&["END"], &["a", "ab E", "ab EN", "ab END", "ab END more"]),
            ("ab ".into(), true)
        );
        // Held back while it could be a stop string, sent once it cannot.
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.advance("x EN", false), "x ");
        assert_eq!(s.advance("x ENOUGH", false), "ENOUGH");
        // The earliest of several stops wins; a stop across rounds is found.
        assert_eq!(
            run(&["\n\n", "b"], &["a\n", "a\nxb\n\n"]),
            ("a\nx".into(), true)
        );
        assert_eq!(run(&[], &["a", "ab"]), ("ab".into(), false));
    }

    #[test]
    fn unfinished_characters_wait_for_their_last_byte() {
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.advance("caf\u{FFFD}", false), "caf");
        assert_eq!(s.advance("café", false), "é");
        // A decode that rewrites sent text sends nothing until it extends it again.
        assert_eq!(s.advance("cafe", false), "");
        assert_eq!(s.advance("café!", true), "!");
    }
}
