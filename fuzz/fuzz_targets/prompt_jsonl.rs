//! A prompt file (JSONL or plain lines) as arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = eesd_infer::prompts::parse_prompts(text, std::path::Path::new("fuzz.jsonl"));
    }
});
