//! Run a bootstrap and three nodes inside this process (real swarms on loopback) and
//! generate through them with the embeddable client.
//!
//! `cargo run --release --example in_process_mesh`

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::builtin;
use mesh_core::BlockRange;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = builtin::DEFAULT.ensure()?;
    let blocks = mesh_core::model::ModelFiles::open(&dir)?
        .config
        .num_blocks();
    let mesh = LocalMesh::start(&dir, &BlockRange::even_split(blocks, 3)).await?;
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(&dir)
        .build()
        .await?;
    let mut tokens = client
        .generate("In-process mesh:", SamplingParams::greedy(24))
        .await?;
    while let Some(token) = tokens.next().await {
        let token = token?;
        println!(
            "{:>4} {:?} {:.2} ms via {} hops",
            token.id,
            token.text,
            token.latency.as_secs_f64() * 1e3,
            token.route.len()
        );
    }
    mesh.stop().await?;
    Ok(())
}
