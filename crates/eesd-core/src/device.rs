//! Parsing `--device` and `--dtype`, and the defaults: CUDA when a GPU is present, else CPU;
//! bf16 on both (issue 7). On CPU, decoding runs our native kernels, for which bf16 weights halve
//! the bytes per token of f32 and keep verification exact; torch's own bf16 GEMMs (used for
//! prefill and training) are fast where the CPU has AMX or AVX512-BF16.

use crate::error::{Error, Result};
use tch::{Device, Kind};

/// `cpu`, `cuda` or `cuda:N`; `None` picks CUDA when available.
pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    let dev = match spec {
        None => return Ok(Device::cuda_if_available()),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(s) if s.starts_with("cuda:") => Device::Cuda(s[5..].parse().map_err(|_| {
            Error::Input(format!("bad device `{s}`: expected cpu, cuda or cuda:N"))
        })?),
        Some(s) => {
            return Err(Error::Input(format!(
                "bad device `{s}`: expected cpu, cuda or cuda:N"
            )))
        }
    };
    if let Device::Cuda(i) = dev {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            return Err(Error::Input(format!(
                "device cuda:{i} requested but {n} CUDA device(s) are available"
            )));
        }
    }
    Ok(dev)
}

/// `f32`, `f16` or `bf16`; `None` picks bf16 (on CPU and CUDA alike).
pub fn parse_dtype(spec: Option<&str>, device: Device) -> Result<Kind> {
    let _ = device;
    match spec {
        None => Ok(Kind::BFloat16),
        Some("f32" | "float32") => Ok(Kind::Float),
        Some("f16" | "float16") => Ok(Kind::Half),
        Some("bf16" | "bfloat16") => Ok(Kind::BFloat16),
        Some(s) => Err(Error::Input(format!(
            "bad dtype `{s}`: expected f32, f16 or bf16"
        ))),
    }
}

/// Waits for queued device work, so a host clock read after it measures finished work.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Whether the native CPU kernels (`crate::native`) run a model on a CPU (`cpu`) or not, from
/// the `--kernels` flag: native or torch, by default native on the CPU and torch on CUDA.
pub fn native_kernels(kernels: Option<&str>, cpu: bool) -> Result<bool> {
    match kernels {
        None => Ok(cpu),
        Some("torch") => Ok(false),
        Some("native") if cpu => Ok(true),
        Some("native") => Err(Error::Input(
            "--kernels native runs on the CPU only; use --kernels torch on CUDA".into(),
        )),
        Some(k) => Err(Error::Input(format!(
            "bad --kernels `{k}`: expected native or torch"
        ))),
    }
}

/// [`native_kernels`] for the frozen base of eesd-train, from the `--device` flag as written
/// (whether the device exists is checked where the model loads), before any model loads.
pub fn base_on_native(kernels: Option<&str>, device: Option<&str>) -> Result<bool> {
    let cpu = match device {
        None => !tch::Cuda::is_available(),
        Some(d) => d == "cpu",
    };
    native_kernels(kernels, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(parse_device(Some("cpu")).unwrap(), Device::Cpu);
        assert!(parse_device(Some("tpu")).is_err());
        assert!(parse_device(Some("cuda:x")).is_err());
        assert!(parse_device(Some("cuda:99")).is_err());
        assert_eq!(parse_dtype(None, Device::Cpu).unwrap(), Kind::BFloat16);
        assert_eq!(
            parse_dtype(Some("bf16"), Device::Cpu).unwrap(),
            Kind::BFloat16
        );
        assert!(parse_dtype(Some("int8"), Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("int8"));
    }
}
