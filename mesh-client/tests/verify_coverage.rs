//! `--verify` never checks nothing in silence (issue 14, item 4). Without
//! `--verify-locally`, a second opinion on a hop comes from another server of its blocks;
//! a span with a single server has none. The user is told so when the generation starts,
//! and the result counts the checks done on every hop.

use std::process::Command;

use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::BlockRange;

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");

#[test]
fn a_span_with_one_server_and_no_local_weights_is_reported_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One server of every block: nobody to ask for a second opinion.
    let mesh = rt
        .block_on(LocalMesh::start(&model_dir, &[BlockRange::new(0, 8)]))
        .unwrap();
    let out = Command::new(CLI)
        .args(["generate", "--verify", "1", "--max-tokens", "6"])
        .args(["--temperature", "0", "--prompt", "Hello mesh"])
        .arg("--bootstrap")
        .arg(mesh.bootstrap_addr().to_string())
        .arg("--model-dir")
        .arg(&model_dir)
        .arg("--ledger-dir")
        .arg(dir.path().join("client"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{all}");
    // At the start: which blocks go unchecked, and the way out.
    let warning = stderr
        .lines()
        .find(|l| l.contains("will not be checked"))
        .unwrap_or_else(|| panic!("no warning that blocks go unchecked:\n{all}"));
    assert!(warning.contains("blocks [0, 8)"), "{warning}");
    assert!(warning.contains("--verify-locally"), "{warning}");
    // In the result: the checks done per hop, none here, and why.
    let result = stdout
        .lines()
        .find(|l| l.contains("blocks [0, 8)") && l.contains("checks"))
        .unwrap_or_else(|| panic!("no count of the checks per hop in the result:\n{all}"));
    assert!(result.contains(": 0 checks"), "{result}");
    assert!(result.contains("unchecked"), "{result}");
    rt.block_on(mesh.stop()).unwrap();
}

/// The control: with a second server of the blocks, every hop of the session is checked
/// (a final check runs at the end whatever the rate), and the count says how often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_witness_every_hop_counts_its_checks() {
    use futures::StreamExt;
    use mesh_client::{MeshClient, SamplingParams};
    use mesh_core::pipeline::VerifyConfig;

    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let spans = [BlockRange::new(0, 8), BlockRange::new(0, 8)];
    let mesh = LocalMesh::start(dir.path(), &spans).await.unwrap();
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir.path())
        .verify(VerifyConfig {
            rate: 1.0,
            ..VerifyConfig::default()
        })
        .build()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while client.nodes().await.unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "second server unheard"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut stream = client
        .generate("Hello mesh", SamplingParams::greedy(6))
        .await
        .unwrap();
    while let Some(t) = stream.next().await {
        t.unwrap();
    }
    let checks = &stream.report().unwrap().checks;
    assert!(!checks.is_empty());
    assert!(
        checks.iter().all(|c| c.second_opinion && c.checks >= 1),
        "{checks:?}"
    );
    mesh.stop().await.unwrap();
}
