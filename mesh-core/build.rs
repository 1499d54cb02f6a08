//! With the `cuda` feature, compile mesh's own decode kernels to PTX with nvcc.
//!
//! PTX (not a cubin) so that one build runs on every GPU generation the driver can JIT
//! for; `CUDA_COMPUTE_CAP` (as candle reads it, default 80: bf16 needs Ampere) sets the
//! virtual architecture. nvcc is found as candle's build finds it: on PATH, or in
//! `$CUDA_HOME/bin` / `$CUDA_PATH/bin`.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/model/kernels/decode.cu";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("decode.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|home| PathBuf::from(home).join("bin/nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(SOURCE)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature needs nvcc ({}): {e}; see scripts/cuda-toolchain.sh",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {SOURCE}");
}
