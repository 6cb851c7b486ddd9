//! Link libtorch so that its CUDA half is kept and found at run time.
//!
//! The linker drops `libtorch_cuda.so` when nothing references it by symbol (`--as-needed`),
//! and CUDA is then silently unavailable. `--no-as-needed -ltorch` keeps it, and the rpath
//! lets binaries and test executables run without `LD_LIBRARY_PATH` (EESD.md section 5).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
        println!("cargo:rustc-link-search=native={lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
}
