//! Speculative decoding over a real mesh of the demo model: `mesh-client generate` with a
//! draft model writes exactly what it writes without one, greedy and sampled, in fewer
//! steps through the mesh.

use std::process::Command;

use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::builtin::Builtin;
use mesh_core::model::ModelFiles;
use mesh_core::BlockRange;

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");
const PROMPT: &str = "It is a truth universally acknowledged";

/// What `mesh-client generate` printed: the text, and the speculation line if any.
struct Run {
    text: String,
    speculation: Option<String>,
}

async fn generate(mesh: &LocalMesh, home: &std::path::Path, extra: &[&str]) -> Run {
    let mut cmd = Command::new(CLI);
    cmd.args(["generate", "--max-tokens", "40", "--prompt", PROMPT])
        .arg("--bootstrap")
        .arg(mesh.bootstrap_addr().to_string())
        .args(extra)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "error");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout
        .split_once("\n\nroute:")
        .map(|(t, _)| t.to_owned())
        .unwrap_or_else(|| panic!("no route print in:\n{stdout}"));
    let speculation = stdout
        .lines()
        .find(|l| l.starts_with("speculation:"))
        .map(str::to_owned);
    Run { text, speculation }
}

/// `steps`, `tokens` and `accepted` of a speculation line.
fn numbers(line: &str) -> (usize, usize, usize) {
    let words: Vec<&str> = line.split(' ').collect();
    let after = |w: &str| -> usize {
        let at = words.iter().position(|x| *x == w).unwrap();
        words[at - 1].parse().unwrap()
    };
    (after("steps"), after("tokens"), after("of"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_changes_the_round_trips_not_the_text() {
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    let dir = Builtin::Demo.ensure_under(&models).unwrap();
    let blocks = ModelFiles::open(&dir).unwrap().config.num_blocks();
    let mesh = LocalMesh::start(&dir, &BlockRange::even_split(blocks, 3))
        .await
        .unwrap();
    for sampling in [&["--temperature", "0"][..], &["--seed", "7"][..]] {
        let plain = generate(&mesh, home.path(), sampling).await;
        assert!(plain.speculation.is_none());
        for draft in ["mesh-demo-draft", "mesh-demo"] {
            let args = [sampling, &["--draft-model", draft]].concat();
            let fast = generate(&mesh, home.path(), &args).await;
            let line = fast.speculation.expect("a speculation line");
            println!("{sampling:?} draft {draft}: {line}");
            assert_eq!(
                fast.text, plain.text,
                "draft {draft} changed the text ({sampling:?})"
            );
            let (steps, tokens, accepted) = numbers(&line);
            assert!(steps < tokens, "no step made two tokens: {line}");
            assert!(accepted > 0, "{line}");
            if draft == "mesh-demo" && sampling[0] == "--temperature" {
                // The target as its own draft, greedy: it agrees with nearly everything.
                assert!(steps * 3 <= tokens, "{line}");
            }
        }
    }
    mesh.stop().await.unwrap();
}
