//! A training recipe as arbitrary text: parsing and checking every table gives a recipe or an
//! error (nothing runs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = eesd_train::recipe::parse(text, std::path::Path::new("fuzz.toml"), false, false);
    }
});
