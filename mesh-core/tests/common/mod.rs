//! Helpers shared by mesh-core's integration tests; not every test file uses every one.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

/// Largest absolute difference between `got` and `want`, relative to `want`'s largest
/// magnitude: the measure every logits comparison here uses.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

/// A random-weight model larger than the fixtures, written as safetensors in `dir`: wide
/// enough (hidden 256, intermediate 768) that q4k applies to every matrix instead of
/// falling back to q8_0.
pub fn larger_model(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = mesh_core::model::LlamaConfig::from_json(
        &serde_json::json!({
            "vocab_size": 259, "hidden_size": 256, "intermediate_size": 768,
            "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1,
            "eos_token_id": 2
        })
        .to_string(),
    )
    .unwrap();
    mesh_core::model::tiny::write_random(dir, &cfg).unwrap();
    dir.to_path_buf()
}

/// Reads `read` every 50 ms until `done` holds for what it gives, and returns that; panics
/// after `limit`, saying what it waited for and what it saw last.
pub async fn wait_until<T: std::fmt::Debug, F: Future<Output = T>>(
    what: &str,
    limit: Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = read().await;
        if done(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `client`'s counters until `done` holds for them (see [`wait_until`]).
pub async fn wait_stats(
    client: &mesh_core::p2p::Client,
    what: &str,
    done: impl Fn(&mesh_core::p2p::P2pStats) -> bool,
) -> mesh_core::p2p::P2pStats {
    let read = || async { client.stats().await.unwrap() };
    wait_until(what, Duration::from_secs(30), read, done).await
}
