//! Aggregate decode throughput of one server as clients are added: 1, 4, 16 and 32
//! clients (each its own peer, its own swarm) generate 64 tokens each at the same time
//! through one server of the whole tiny model, on loopback in this process. Every
//! client's text is checked against its text alone.
//!
//! Run: `cargo bench --bench concurrent` (TOKENS=n per client, default 64).

use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::BlockRange;

/// One greedy generation; its token ids.
async fn generate(client: &MeshClient, prompt: &str, tokens: usize) -> anyhow::Result<Vec<u32>> {
    let mut stream = client
        .generate(prompt, SamplingParams::greedy(tokens))
        .await?;
    let mut ids = Vec::with_capacity(tokens);
    while let Some(t) = stream.next().await {
        ids.push(t?.id);
    }
    Ok(ids)
}

fn prompt(i: usize) -> String {
    format!("client {i} asks the mesh")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tokens: usize = std::env::var("TOKENS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::tempdir()?;
    tiny::write(dir.path())?;
    let mesh = LocalMesh::start(dir.path(), &[BlockRange::new(0, 8)]).await?;
    let most = 32;
    let mut clients = Vec::with_capacity(most);
    for _ in 0..most {
        clients.push(
            MeshClient::builder()
                .bootstrap([mesh.bootstrap_addr().clone()])
                .model_dir(dir.path())
                .build()
                .await?,
        );
    }
    // Each client's text alone (also the warm-up: connections, page faults).
    let mut alone = Vec::with_capacity(most);
    for (i, c) in clients.iter().enumerate() {
        alone.push(generate(c, &prompt(i), tokens).await?);
    }
    println!("one server (tiny model, 8 blocks), loopback, greedy, {tokens} tokens per client");
    println!(
        "{:>8} {:>12} {:>14} {:>10}",
        "clients", "wall", "tokens/s", "vs 1"
    );
    let mut base = None;
    for n in [1usize, 4, 16, 32] {
        let started = Instant::now();
        let runs = clients[..n]
            .iter()
            .enumerate()
            .map(|(i, c)| async move { generate(c, &prompt(i), tokens).await });
        let texts = futures::future::try_join_all(runs).await?;
        let wall = started.elapsed();
        for (i, ids) in texts.iter().enumerate() {
            assert_eq!(
                ids, &alone[i],
                "client {i} of {n} differs from its run alone"
            );
        }
        let rate = (n * tokens) as f64 / wall.as_secs_f64();
        let base = *base.get_or_insert(rate);
        println!(
            "{n:>8} {:>10.1}ms {rate:>14.0} {:>9.2}x",
            wall.as_secs_f64() * 1e3,
            rate / base
        );
    }
    mesh.stop().await?;
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
