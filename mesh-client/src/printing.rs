//! What `mesh-client` prints around a generation: the text as it streams, the route, the
//! timing, speculation and check summaries, and the receipts. (Part of the binary.)

use std::io::Write;

use futures::StreamExt;
use mesh_client::MeshClient;

use crate::Sampling;

/// How a server's weights are stored, for people: its label, or full precision.
pub fn weights_label(quantization: &str) -> &str {
    if quantization.is_empty() {
        "full precision"
    } else {
        quantization
    }
}

/// Stream a generation, then print each token's route and latency.
pub async fn stream(client: &MeshClient, sampling: &Sampling) -> anyhow::Result<()> {
    print!("{}", sampling.prompt);
    let mut tokens = client.generate(&sampling.prompt, sampling.params()).await?;
    let mut made = Vec::new();
    while let Some(token) = tokens.next().await {
        let token = token?;
        print!("{}", token.text);
        let _ = std::io::stdout().flush();
        made.push(token);
    }
    println!();
    // The weights each hop announced (heartbeats heard so far).
    let nodes = client.nodes().await.unwrap_or_default();
    if let Some(first) = made.first() {
        println!("\nroute:");
        print_route(&first.route, &nodes);
    }
    // The route changes when a server fails, or when servers take back blocks this client
    // ran itself.
    if let Some(last) = made
        .last()
        .filter(|l| made.first().is_some_and(|f| f.route != l.route))
    {
        println!("route at the end:");
        print_route(&last.route, &nodes);
    }
    let mut decode: Vec<f64> = made
        .iter()
        .skip(1)
        .map(|t| t.latency.as_secs_f64() * 1e3)
        .collect();
    decode.sort_by(f64::total_cmp);
    // The stream has ended, so every hop closed with its final receipt: the cost is the
    // sum of the receipts countersigned, fail-overs' replays and witness checks included.
    let cost = tokens.report().map_or(0, |r| r.countersigned);
    if let (Some(first), Some(median)) = (made.first(), decode.get(decode.len() / 2)) {
        // The mean too: with a draft, a step's tokens share its time, and the median of
        // such tokens can hide the steps that made one.
        let mean = decode.iter().sum::<f64>() / decode.len() as f64;
        println!(
            "{} tokens; prefill {:.1} ms, per-token median {median:.2} ms, mean {mean:.2} ms, max {:.2} ms; cost {cost}",
            made.len(),
            first.latency.as_secs_f64() * 1e3,
            decode.last().copied().unwrap_or(0.0),
        );
    }
    if let Some(s) = tokens.report().and_then(|r| r.speculation) {
        println!(
            "speculation: {} steps through the mesh for {} tokens ({:.2} per step); {} of {} \
             draft tokens accepted ({:.0}%)",
            s.steps,
            s.tokens,
            s.tokens_per_step(),
            s.accepted,
            s.proposed,
            s.acceptance() * 100.0
        );
    }
    // A rate above 0 does not mean every hop was checked: say which were, and how often.
    let checks = tokens.report().map_or(&[][..], |r| &r.checks[..]);
    if !checks.is_empty() {
        println!("checks (second opinions) per hop:");
    }
    for c in checks {
        let why = if c.second_opinion {
            ""
        } else {
            " (unchecked: no other server of these blocks, and no --verify-locally)"
        };
        println!(
            "  blocks {} on {}: {} checks{why}",
            c.hop.span, c.hop.peer, c.checks
        );
    }
    Ok(())
}

/// Each hop of a route: the blocks, who runs them, and how that server's weights are
/// stored when a heartbeat in `nodes` said so (a client routing from DHT records may print
/// its route before the first heartbeat).
fn print_route(route: &[mesh_core::pipeline::Hop], nodes: &[mesh_core::ServerInfo]) {
    for hop in route {
        if hop.local {
            println!(
                "  blocks {} on this client (--fallback local: no server covers them)",
                hop.span
            );
        } else {
            let weights = nodes
                .iter()
                .find(|n| n.peer_id == hop.peer)
                .map_or(String::new(), |n| {
                    format!(" ({})", weights_label(&n.quantization))
                });
            println!("  blocks {} on {}{weights}", hop.span, hop.peer);
        }
    }
}

pub fn print_receipts(client: &MeshClient) -> anyhow::Result<()> {
    let receipts = client.receipts(20)?;
    println!(
        "\nreceipts (signed by the server, countersigned here): {}",
        receipts.len()
    );
    for r in receipts {
        let r = &r.receipt;
        println!(
            "  {} blocks {} prefill {} decode {} amount {} seq {}",
            r.terms.server, r.terms.span, r.prefill_tokens, r.decode_tokens, r.amount, r.seq
        );
    }
    Ok(())
}
