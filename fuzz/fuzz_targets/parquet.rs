//! A corpus or teacher-data parquet file as arbitrary bytes: both readers give rows or an
//! error (the fuzzer seeds from files the writers made).
#![no_main]
use libfuzzer_sys::fuzz_target;

thread_local! {
    static PATH: std::path::PathBuf =
        std::env::temp_dir().join(format!("eesd-fuzz-{}.parquet", std::process::id()));
}

fuzz_target!(|data: &[u8]| {
    PATH.with(|p| {
        std::fs::write(p, data).unwrap();
        let spec = p.to_str().unwrap();
        let _ = eesd_core::corpus::read_prompts(spec, "prompt");
        let _ = eesd_core::corpus::read_teacher(spec);
    });
});
