//! config.json as arbitrary bytes: parsing and resolving it gives a config or an error.
#![no_main]
use eesd_core::config::HfConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<HfConfig>(data) {
        if let Ok(c) = cfg.resolve() {
            // What the loaders compute from a resolved config must not overflow or panic.
            let _ = c.weight_params_per_token();
        }
    }
});
