//! Speculative decoding on a loopback mesh of the demo model, side by side in one run:
//! decode time per token without a draft, with `mesh-demo-draft` (two blocks, same
//! tokenizer) and with the target as its own draft (every proposal right: the upper
//! bound), each starting at k = 2, 4 and 8 proposals per step.
//!
//! A bootstrap and 3 servers (blocks 0..2, 2..4, 4..6) run in this process on real
//! swarms over TCP; the client is the embeddable `MeshClient`. Greedy, so every row
//! writes the same text (checked).
//!
//! Run: `cargo bench --bench speculative` (TOKENS=n per prompt, default 96).

use std::time::Duration;

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams, SpeculationStats};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::builtin::Builtin;
use mesh_core::model::ModelFiles;
use mesh_core::BlockRange;

const PROMPTS: [&str; 3] = [
    "It is a truth universally acknowledged",
    "Sherlock Holmes took his bottle from the corner of the mantelpiece",
    "The mesh runs models on everyone's GPUs.",
];

struct Row {
    text: Vec<String>,
    decode: Duration,
    tokens: usize,
    stats: SpeculationStats,
}

async fn run(client: &MeshClient, tokens: usize) -> anyhow::Result<Row> {
    let mut row = Row {
        text: Vec::new(),
        decode: Duration::ZERO,
        tokens: 0,
        stats: SpeculationStats::default(),
    };
    for prompt in PROMPTS {
        let mut stream = client
            .generate(prompt, SamplingParams::greedy(tokens))
            .await?;
        let mut text = String::new();
        let mut first = true;
        while let Some(t) = stream.next().await {
            let t = t?;
            text.push_str(&t.text);
            if !first {
                row.decode += t.latency;
                row.tokens += 1;
            }
            first = false;
        }
        if let Some(s) = stream.report().and_then(|r| r.speculation) {
            row.stats.steps += s.steps;
            row.stats.proposed += s.proposed;
            row.stats.accepted += s.accepted;
            row.stats.tokens += s.tokens;
        }
        row.text.push(text);
    }
    Ok(row)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tokens: usize = std::env::var("TOKENS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(96);
    let home = tempfile::tempdir()?;
    let target = Builtin::Demo.ensure_under(home.path())?;
    let draft = Builtin::DemoDraft.ensure_under(home.path())?;
    let blocks = ModelFiles::open(&target)?.config.num_blocks();
    let mesh = LocalMesh::start(&target, &BlockRange::even_split(blocks, 3)).await?;
    // Time the steady state: two servers that dialed each other at once push by
    // request-response until one of the two connections is closed.
    if !mesh.settle(Duration::from_secs(30)).await {
        eprintln!("warning: the mesh's servers still hold two connections to a peer");
    }
    let client = |d: Option<(&std::path::Path, usize)>| {
        let mut b = MeshClient::builder()
            .bootstrap([mesh.bootstrap_addr().clone()])
            .model_dir(&target);
        if let Some((dir, k)) = d {
            b = b.draft_model_dir(dir).draft_tokens(k);
        }
        b.build()
    };
    let plain_client = client(None).await?;
    // Warm up: the first sessions pay for connections and page faults.
    run(&plain_client, 8).await?;
    let plain = run(&plain_client, tokens).await?;
    let base = plain.decode.as_secs_f64() * 1e3 / plain.tokens.max(1) as f64;
    println!(
        "speculative decoding, demo model over 3 loopback servers, greedy, {} prompts x {tokens} tokens",
        PROMPTS.len()
    );
    println!(
        "{:<18} {:>3} {:>10} {:>12} {:>13} {:>10}",
        "draft", "k", "accepted", "tokens/step", "ms/token", "vs none"
    );
    println!(
        "{:<18} {:>3} {:>10} {:>12.2} {:>13.3} {:>9.2}x",
        "none", "-", "-", 1.0, base, 1.0
    );
    for (name, dir) in [("mesh-demo-draft", &draft), ("mesh-demo (self)", &target)] {
        for k in [2usize, 4, 8] {
            let c = client(Some((dir, k))).await?;
            let row = run(&c, tokens).await?;
            assert_eq!(row.text, plain.text, "the draft {name} changed the text");
            let ms = row.decode.as_secs_f64() * 1e3 / row.tokens.max(1) as f64;
            println!(
                "{:<18} {:>3} {:>9.0}% {:>12.2} {:>13.3} {:>9.2}x",
                name,
                k,
                row.stats.acceptance() * 100.0,
                row.stats.tokens_per_step(),
                ms,
                ms / base
            );
        }
    }
    mesh.stop().await?;
    Ok(())
}
