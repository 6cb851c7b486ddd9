//! Link libtorch so that its CUDA half is kept and found at run time, and build the CUDA graph
//! shim (`csrc/cuda_graph.cpp`) where libtorch has CUDA.
//!
//! The linker drops `libtorch_cuda.so` when nothing references it by symbol (`--as-needed`),
//! and CUDA is then silently unavailable. `--no-as-needed -ltorch` keeps it, and the rpath
//! lets binaries and test executables run without `LD_LIBRARY_PATH` (EESD.md section 5).
//!
//! The shim needs libtorch's CUDA headers, which include the CUDA runtime's: it is compiled
//! only when `libtorch_cuda.so` and `cuda_runtime_api.h` are both found (the venv's triton
//! or CUDA wheels, `CUDA_HOME` or `/usr/local/cuda`), and then sets `cfg(eesd_cuda_graphs)`; without
//! it, `eesd_core::cuda_graph` reports graphs as unavailable and decoding runs eagerly.
use std::path::{Path, PathBuf};

fn cuda_include(torch_lib: &Path) -> Option<PathBuf> {
    // torch/lib -> site-packages
    let site = torch_lib.parent()?.parent()?;
    // Triton, which the CUDA torch wheels install, carries a full set of CUDA headers; the
    // runtime wheel's lack `crt/` (it comes with nvcc).
    let mut candidates = vec![
        site.join("triton/backends/nvidia/include"),
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cuda_runtime/include"),
    ];
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(Path::new(&home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(eesd_cuda_graphs)");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=EESD_NO_CUDA_GRAPHS");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(lib) = &lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
        println!("cargo:rustc-link-search=native={lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-ltorch_cuda");

    // The shim is eesd-core's; the other crates share this script for the link settings.
    let Some(lib) = lib.map(PathBuf::from) else {
        return;
    };
    if std::env::var("CARGO_PKG_NAME").as_deref() != Ok("eesd-core") {
        return;
    }
    if std::env::var_os("EESD_NO_CUDA_GRAPHS").is_some() || !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    let Some(cuda_inc) = cuda_include(&lib) else {
        println!(
            "cargo:warning=libtorch has CUDA but no cuda_runtime_api.h was found: CUDA graphs are not built"
        );
        return;
    };
    let torch_inc = lib
        .parent()
        .expect("torch/lib has a parent")
        .join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&torch_inc)
        .include(&cuda_inc)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("csrc/cuda_graph.cpp")
        .compile("eesd_cuda_graph");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-cfg=eesd_cuda_graphs");
}
