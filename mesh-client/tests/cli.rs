//! The `mesh-client` binary as a user runs it: its defaults and what it prints.

use std::process::Command;

use mesh_client::SamplingParams;
use mesh_core::model::{tiny, LocalModel};

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");

/// `--temperature 0` is plain greedy decoding, as `SamplingParams::greedy` and the OpenAI
/// gateway do it: no repetition penalty unless asked for (transformers' `generate`
/// defaults to 1.0 too), so the CLI and the API give the same "greedy" text.
#[test]
fn temperature_zero_in_the_cli_is_plain_greedy() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let prompt = "the the the mesh mesh mesh";
    // What the CLI prints is the streamed text, so compare with the streamed text.
    let mut want = String::new();
    LocalModel::load_split(dir.path(), 1, &candle_core::Device::Cpu)
        .unwrap()
        .generate(prompt, &SamplingParams::greedy(40), |t| want.push_str(t))
        .unwrap();
    let out = Command::new(CLI)
        .args([
            "local",
            "--spans",
            "1",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ])
        .arg("--prompt")
        .arg(prompt)
        .arg("--model-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{prompt}{want}\n--")),
        "the CLI's greedy text differs from plain greedy {want:?}:\n{stdout}"
    );
    assert_eq!(SamplingParams::default().repetition_penalty, 1.0);
}
