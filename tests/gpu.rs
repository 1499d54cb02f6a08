//! The GPU check's sections as tests (`cargo test --features cuda --test gpu`). Where no
//! GPU can be used (CI builds this with the `cuda` feature on a machine without one)
//! each test says it was skipped and why; it never passes silently. Their CPU twins are
//! the kernels' reference tests in mesh-core and the in-process mesh tests.
#![cfg(feature = "cuda")]

use std::path::Path;

use candle_core::Device;
use mesh::gpu_check::{self, Row};
use mesh_core::model::device::select;
use mesh_core::model::DeviceSpec;

fn gpu(test: &str) -> Option<Device> {
    let selected = select(DeviceSpec::Cuda(0));
    if selected.fell_back {
        eprintln!("SKIPPED {test}: no GPU: {}", selected.description);
        return None;
    }
    Some(selected.device)
}

fn assert_all_ok(rows: &[Row]) {
    let failed: Vec<&Row> = rows.iter().filter(|r| r.ok == Some(false)).collect();
    assert!(failed.is_empty(), "{}", gpu_check::render(rows));
    assert!(
        rows.iter().any(|r| r.ok == Some(true)),
        "nothing was checked"
    );
}

#[test]
fn kernels_agree_with_their_cpu_references_on_the_gpu() {
    let Some(device) = gpu("kernels") else { return };
    assert_all_ok(&gpu_check::kernels(&device).unwrap());
}

#[test]
fn fixtures_on_the_gpu_match_the_cpu_and_transformers() {
    let Some(device) = gpu("fixtures") else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mesh-core/tests/fixtures");
    assert_all_ok(&gpu_check::fixtures(&device, &dir).unwrap());
}

#[tokio::test]
async fn a_three_node_mesh_on_the_gpu_gives_the_cpu_tokens() {
    if gpu("mesh").is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    assert_all_ok(
        &gpu_check::mesh(DeviceSpec::Cuda(0), work.path())
            .await
            .unwrap(),
    );
}
