//! Helpers shared by mesh-core's integration tests.

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
/// falling back to q8_0. Not every test file sharing this module uses it.
#[allow(dead_code)]
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
