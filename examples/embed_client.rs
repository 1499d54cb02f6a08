//! Embed the client: join a mesh through a bootstrap and stream tokens.
//!
//! Two machines (or two terminals):
//! ```text
//! machine A$ mesh-bootstrap                       # prints /ip4/.../tcp/31337/p2p/12D3...
//! machine A$ mesh-node start --bootstrap <addr> --blocks 0..3
//! machine B$ mesh-node start --bootstrap <addr>   # takes the blocks nobody serves
//! anywhere$  cargo run --release --example embed_client -- <addr>
//! ```

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bootstrap = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: embed_client <bootstrap multiaddr>"))?;
    let client = MeshClient::builder()
        .bootstrap([bootstrap.parse()?])
        .model("mesh-demo")
        .build()
        .await?;
    let mut tokens = client
        .generate("Once upon a time", SamplingParams::greedy(32))
        .await?;
    while let Some(token) = tokens.next().await {
        let token = token?;
        print!("{}", token.text);
    }
    println!();
    Ok(())
}
