//! The embedded tiny model: a real Hugging Face directory made from a fixed seed.
//!
//! Nothing is downloaded, yet the default demo and the tests go through exactly the
//! code path a real model does: `config.json`, `model.safetensors`, `tokenizer.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{LlamaConfig, ModelError};

/// The name the tiny model is served under.
pub const TINY_MODEL_ID: &str = "tiny-llama-mesh";

/// Bumped whenever the generated files change, so stale copies are rewritten.
const TINY_VERSION: &str = "1";
const SEED: u64 = 0x6d65_7368; // "mesh"
/// Written last into a directory holding the tiny model.
pub(crate) const MARKER: &str = "mesh-tiny.version";

/// Special tokens, then the 256 byte-level tokens.
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// Config of the tiny model: 8 blocks, grouped-query attention, byte-level vocabulary.
pub fn config() -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size: SPECIALS.len() + 256,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: Some(2),
        head_dim: None,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        bos_token_id: Some(1),
        eos_token_id: Some(super::config::EosTokens::One(2)),
        rope_parameters: None,
        architectures: None,
        sliding_window: None,
        use_sliding_window: false,
    }
}

/// Where the tiny model lives unless told otherwise: `$MESH_HOME/models/<id>-v<version>`.
pub fn default_dir() -> PathBuf {
    crate::paths::mesh_home().join("models").join(dir_name())
}

/// The tiny model's directory name under a `models` directory.
pub(crate) fn dir_name() -> String {
    format!("{TINY_MODEL_ID}-v{TINY_VERSION}")
}

/// Write the tiny model into `dir` unless an identical copy is already there.
pub fn ensure(dir: &Path) -> Result<PathBuf, ModelError> {
    let marker = dir.join(MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|v| v == TINY_VERSION) {
        return Ok(dir.to_path_buf());
    }
    write(dir)?;
    Ok(dir.to_path_buf())
}

/// Generate and write the tiny model into `dir` (created if needed).
pub fn write(dir: &Path) -> Result<(), ModelError> {
    write_random(dir, &config())
}

/// Write a random-weight model of shape `cfg` (same weight law and byte tokenizer as the
/// tiny model) into `dir`: how tests make models larger than the tiny one.
pub fn write_random(dir: &Path, cfg: &LlamaConfig) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg = cfg.clone();
    let config_json = serde_json::to_string_pretty(&config_json(&cfg))
        .map_err(|e| ModelError::Unsupported(e.to_string()))?;
    write_atomic(&dir.join("config.json"), config_json.as_bytes())?;
    write_atomic(&dir.join("tokenizer.json"), tokenizer_json().as_bytes())?;

    let tensors = weights(&cfg)?;
    let tmp = dir.join(format!(".model.safetensors.{}", std::process::id()));
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| ModelError::Write {
        path: tmp.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let dest = dir.join("model.safetensors");
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    write_atomic(&dir.join(MARKER), TINY_VERSION.as_bytes())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |source| ModelError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The config as HF writes it, architectures and dtype included.
fn config_json(cfg: &LlamaConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.retain(|_, value| !value.is_null());
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("torch_dtype".into(), serde_json::json!("float32"));
    }
    v
}

/// Weights drawn uniformly with a per-tensor scale chosen so activations stay O(1)
/// through all blocks and the logits are far from uniform.
fn weights(cfg: &LlamaConfig) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut out = BTreeMap::new();
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let mut put = |name: String, shape: &[usize], std: f32| -> Result<(), ModelError> {
        let n: usize = shape.iter().product();
        let bound = std * 3f32.sqrt();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
        out.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, h], 1.0)?;
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
        put(format!("{p}.self_attn.q_proj.weight"), &[q, h], fan_in(h))?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], fan_in(h))?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], fan_in(h))?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, q], fan_in(q))?;
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], fan_in(h))?;
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], fan_in(h))?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, i], fan_in(i))?;
        put(format!("{p}.input_layernorm.weight"), &[h], 0.1)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.1)?;
    }
    put("model.norm.weight".into(), &[h], 0.1)?;
    put(
        "lm_head.weight".into(),
        &[v, h],
        1.0 / (h as f32).sqrt() * 4.0,
    )?;
    // Norm scales around 1, not 0.
    for (name, t) in out.iter_mut() {
        if name.ends_with("norm.weight") {
            *t = (t.clone() + 1.0)?;
        }
    }
    Ok(out)
}

/// GPT-2's reversible map from bytes to printable characters, used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// A byte-level BPE tokenizer with no merges: every byte is a token, so any text
/// round-trips, and BOS is added by a template post-processor as Llama's tokenizer does.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in SPECIALS.iter().enumerate() {
        vocab.insert((*tok).into(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for (b, c) in byte_to_char().iter().enumerate() {
        vocab.insert(c.to_string(), (SPECIALS.len() + b).into());
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MeshTokenizer;

    #[test]
    fn tokenizer_round_trips_any_text() {
        let tok = MeshTokenizer::from_json(&tokenizer_json()).unwrap();
        let text = "Hello, mesh! Ünïcödé ✓ 🦀\n\ttabs";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], 1, "BOS first");
        assert_eq!(ids.len(), 1 + text.len(), "one token per byte");
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn generation_is_deterministic() {
        let a = weights(&config()).unwrap();
        let b = weights(&config()).unwrap();
        let name = "model.layers.3.mlp.up_proj.weight";
        let diff = (&a[name] - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
