//! CUDA graphs for the decode steps (issue 9), through the C++ shim in `csrc/cuda_graph.cpp`
//! over libtorch's `at::cuda::CUDAGraph`.
//!
//! A captured graph holds the device addresses of every tensor its kernels touched: its
//! inputs must be refilled in place (never replaced) before a replay, its outputs are
//! overwritten by the next replay, and the buffers it writes (a KV cache) must outlive it.
//! [`available`] is false where the shim was not built (no CUDA libtorch at build time) or no
//! CUDA device is present; callers then run eagerly, which computes the same thing.

use crate::{Error, Result};
use tch::Device;

#[cfg(eesd_cuda_graphs)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn eesd_graph_new() -> *mut c_void;
        pub fn eesd_graph_free(g: *mut c_void);
        pub fn eesd_graph_last_error() -> *const c_char;
        pub fn eesd_graph_capture_begin(g: *mut c_void, device: c_int) -> c_int;
        pub fn eesd_graph_capture_end(g: *mut c_void) -> c_int;
        pub fn eesd_graph_replay(g: *mut c_void) -> c_int;
        pub fn eesd_cuda_memory_allocated(
            device: c_int,
            current: *mut u64,
            peak: *mut u64,
        ) -> c_int;
    }
}

/// Whether graphs can be captured on `device`: a CUDA device, and the shim built in.
pub fn available(device: Device) -> bool {
    cfg!(eesd_cuda_graphs) && device.is_cuda()
}

/// Bytes held by live tensors on CUDA device `index` (torch's `memory_allocated`), where the
/// shim is built.
pub fn memory_allocated(index: usize) -> Result<u64> {
    memory_stats(index).map(|(current, _)| current)
}

/// The most bytes live tensors have held on CUDA device `index` so far (torch's
/// `max_memory_allocated`), where the shim is built.
pub fn memory_peak(index: usize) -> Result<u64> {
    memory_stats(index).map(|(_, peak)| peak)
}

/// ", peak GPU memory X GiB" for a report line on CUDA (where the shim is built), else "".
pub fn peak_memory_note(device: Device) -> String {
    match device {
        Device::Cuda(i) => memory_peak(i)
            .map(|b| {
                format!(
                    ", peak GPU memory {:.2} GiB",
                    b as f64 / (1u64 << 30) as f64
                )
            })
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn memory_stats(index: usize) -> Result<(u64, u64)> {
    #[cfg(eesd_cuda_graphs)]
    {
        let (mut current, mut peak) = (0u64, 0u64);
        // SAFETY: both pointers are valid places for the shim to write one u64.
        check(
            unsafe { ffi::eesd_cuda_memory_allocated(index as i32, &mut current, &mut peak) },
            "memory stats",
        )?;
        Ok((current, peak))
    }
    #[cfg(not(eesd_cuda_graphs))]
    {
        let _ = index;
        Err(Error::Input("CUDA graphs are not built in".into()))
    }
}

/// One captured graph.
pub struct CudaGraph {
    #[cfg(eesd_cuda_graphs)]
    ptr: *mut std::ffi::c_void,
}

#[cfg(eesd_cuda_graphs)]
fn check(rc: std::ffi::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(ffi::eesd_graph_last_error()) };
    Err(Error::Input(format!(
        "CUDA graph {what}: {} (EESD_CUDA_GRAPHS=0 runs the decode steps eagerly)",
        msg.to_string_lossy()
    )))
}

impl CudaGraph {
    /// Records the torch ops `f` issues on `device` (nothing runs) and returns the graph with
    /// `f`'s result, whose tensors then live in the graph's private memory: they hold the
    /// graph's outputs after each [`Self::replay`]. Replay once to get the first result.
    /// `f` must not read device values on the host nor copy from host memory.
    pub fn capture<T>(device: Device, f: impl FnOnce() -> T) -> Result<(CudaGraph, T)> {
        #[cfg(eesd_cuda_graphs)]
        {
            let Device::Cuda(index) = device else {
                return Err(Error::Input("CUDA graphs need a CUDA device".into()));
            };
            // SAFETY: plain constructor; null only on allocation failure.
            let ptr = unsafe { ffi::eesd_graph_new() };
            if ptr.is_null() {
                return Err(Error::Input("CUDA graph: could not allocate".into()));
            }
            let graph = CudaGraph { ptr };
            // SAFETY: `ptr` is a live graph owned by `graph`.
            check(
                unsafe { ffi::eesd_graph_capture_begin(ptr, index as i32) },
                "capture",
            )?;
            let out = f();
            // SAFETY: as above; ends the capture begun on this thread.
            check(unsafe { ffi::eesd_graph_capture_end(ptr) }, "capture")?;
            Ok((graph, out))
        }
        #[cfg(not(eesd_cuda_graphs))]
        {
            let _ = (device, f);
            Err(Error::Input(
                "CUDA graphs are not built in (no CUDA libtorch when this was compiled)".into(),
            ))
        }
    }

    /// Launches the recorded work on the current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(eesd_cuda_graphs)]
        {
            // SAFETY: `self.ptr` is a live, captured graph.
            check(unsafe { ffi::eesd_graph_replay(self.ptr) }, "replay")
        }
        #[cfg(not(eesd_cuda_graphs))]
        {
            Err(Error::Input("CUDA graphs are not built in".into()))
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(eesd_cuda_graphs)]
        // SAFETY: `self.ptr` came from `eesd_graph_new` and is freed once, here.
        unsafe {
            ffi::eesd_graph_free(self.ptr)
        }
    }
}
