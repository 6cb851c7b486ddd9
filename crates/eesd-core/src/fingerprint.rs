//! A short, stable identity of a base model: its resolved config plus every tensor name and
//! shape. Teacher data and heads record it, so a head trained on one base is refused by another.

use crate::config::LlamaConfig;

/// 64-bit FNV-1a: tiny, deterministic across platforms and releases (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// `llama-{layers}x{hidden}-{hash}`, readable in error messages and stable for equal models.
pub fn fingerprint(cfg: &LlamaConfig, tensors: &[(String, Vec<i64>)]) -> String {
    let mut text = format!("{cfg:?}\n");
    for (name, shape) in tensors {
        text.push_str(&format!("{name}:{shape:?}\n"));
    }
    format!(
        "llama-{}x{}-{:016x}",
        cfg.num_layers,
        cfg.hidden_size,
        fnv1a(text.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv_reference_values() {
        assert_eq!(super::fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63dc4c8601ec8c);
    }
}
