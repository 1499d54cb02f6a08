//! Aggregate decode throughput of one server as clients are added: 1, 4, 16 and 32
//! clients (each its own peer, its own swarm) generate 64 tokens each at the same time
//! through one server of a whole model, on loopback in this process, with the server
//! running the decode steps that queue together as one pass (`max_batch` 16) and each
//! alone (`max_batch` 1). Two models: the tiny one (8 blocks of hidden 128, 2 MB: it
//! sits in cache, so messages cost more than its weights) and a wide random one (4 blocks
//! of hidden 1024, intermediate 2816, 181 MB of f32: each step streams its weights from
//! memory, as a real model's does), also split over two servers that push each step on
//! to each other, so both batch. Every client's text is checked against its text alone.
//!
//! Run: `cargo bench --bench concurrent` (TOKENS=n per client, default 64; ONLY=tiny or
//! ONLY=wide for one model).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, LlamaConfig};
use mesh_core::pipeline::ServerLimits;
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

/// The tiny model's tokenizer and vocabulary with wide blocks.
fn wide() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 1024,
        intermediate_size: 2816,
        num_hidden_layers: 4,
        num_attention_heads: 16,
        num_key_value_heads: Some(4),
        ..tiny::config()
    }
}

/// Throughput at 1, 4, 16 and 32 clients through servers of `spans` of the model in
/// `dir` that take at most `max_batch` requests at once; `alone` holds each client's text by itself
/// (filled on the first call).
async fn run(
    dir: &Path,
    spans: &[BlockRange],
    max_batch: usize,
    tokens: usize,
    alone: &mut Vec<Vec<u32>>,
) -> anyhow::Result<Vec<f64>> {
    let mut mesh = LocalMesh::start(dir, &[]).await?;
    let limits = ServerLimits {
        max_batch,
        ..ServerLimits::default()
    };
    for span in spans {
        mesh.add_node_with(*span, limits.clone()).await?;
    }
    // Time the steady state: two servers that dialed each other at once push by
    // request-response until one of the two connections is closed.
    if !mesh.settle(Duration::from_secs(30)).await {
        eprintln!("warning: the mesh's servers still hold two connections to a peer");
    }
    let most = 32;
    let mut clients = Vec::with_capacity(most);
    for _ in 0..most {
        clients.push(
            MeshClient::builder()
                .bootstrap([mesh.bootstrap_addr().clone()])
                .model_dir(dir)
                .build()
                .await?,
        );
    }
    // Each client's text alone (also the warm-up: connections, page faults).
    for (i, c) in clients.iter().enumerate() {
        let ids = generate(c, &prompt(i), tokens).await?;
        match alone.get(i) {
            Some(want) => assert_eq!(&ids, want, "client {i} alone differs between servers"),
            None => alone.push(ids),
        }
    }
    let mut rates = Vec::new();
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
        rates.push((n * tokens) as f64 / wall.as_secs_f64());
    }
    mesh.stop().await?;
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(rates)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tokens: usize = std::env::var("TOKENS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(64);
    println!("loopback, greedy, {tokens} tokens per client; tokens/s, and x of 1 client on 1 server batched");
    println!(
        "{:<36} {:>10} {:>16} {:>16} {:>16}",
        "model, servers, steps", "1 client", "4 clients", "16 clients", "32 clients"
    );
    let only = std::env::var("ONLY").ok();
    for (name, cfg) in [("tiny", tiny::config()), ("wide", wide())] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let dir = tempfile::tempdir()?;
        match name {
            "tiny" => tiny::write(dir.path())?,
            _ => tiny::write_random(dir.path(), &cfg)?,
        }
        let blocks = cfg.num_hidden_layers as u32;
        let whole = [BlockRange::new(0, blocks)];
        let halves = BlockRange::even_split(blocks, 2);
        let mut routes = vec![("1 server", &whole[..])];
        if name == "wide" {
            routes.push(("2 servers", &halves[..]));
        }
        let mut alone = Vec::new();
        let mut base = None;
        for (route, spans) in routes {
            for (label, max_batch) in [("batched", 16), ("one at a time", 1)] {
                let rates = run(dir.path(), spans, max_batch, tokens, &mut alone).await?;
                let base = *base.get_or_insert(rates[0]);
                let cells: Vec<String> = rates
                    .iter()
                    .map(|r| format!("{r:.0} ({:.2}x)", r / base))
                    .collect();
                println!(
                    "{:<36} {:>10} {:>16} {:>16} {:>16}",
                    format!("{name}, {route}, {label}"),
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3]
                );
            }
        }
    }
    Ok(())
}
