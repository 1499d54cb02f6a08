//! Sharded checkpoints and half-precision weights load through the same path.

mod common;
use common::relative_error;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{tiny, ClientHead, ModelFiles, SpanModel};
use mesh_core::BlockRange;

const PROMPT: &[u32] = &[1, 84, 104, 101, 32, 109, 101, 115, 104];

fn logits(dir: &Path, dtype: DType) -> Vec<f32> {
    let files = ModelFiles::open(dir).unwrap();
    let head = ClientHead::load(&files, dtype, &Device::Cpu).unwrap();
    let mut hidden = head.embed(PROMPT).unwrap();
    for r in BlockRange::even_split(8, 2) {
        let span = SpanModel::load(&files, r, dtype, &Device::Cpu).unwrap();
        let mut cache = span.new_cache(32).unwrap();
        hidden = span.forward(&mut cache, &hidden, 0).unwrap();
    }
    head.last_logits(&hidden).unwrap()
}

fn all_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn sharded_checkpoint_gives_identical_logits() {
    let single = tempfile::tempdir().unwrap();
    tiny::write(single.path()).unwrap();
    let reference = logits(single.path(), DType::F32);

    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        single.path().join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (name, t) in all_tensors(single.path()) {
        // Blocks 0-3 and the embeddings in one shard, the rest in the other.
        let first = name.contains("embed")
            || ["0", "1", "2", "3"]
                .iter()
                .any(|i| name.starts_with(&format!("model.layers.{i}.")));
        let idx = usize::from(!first);
        let file = format!("model-0000{}-of-00002.safetensors", idx + 1);
        weight_map.insert(name.clone(), file.into());
        shards[idx].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = sharded
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let files = ModelFiles::open(sharded.path()).unwrap();
    assert_eq!(files.weight_files.len(), 2);
    assert_eq!(logits(sharded.path(), DType::F32), reference);
}

#[test]
fn half_precision_weights_load_and_agree() {
    let src = tempfile::tempdir().unwrap();
    tiny::write(src.path()).unwrap();
    let reference = logits(src.path(), DType::F32);
    for stored in [DType::F16, DType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.path().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let converted: HashMap<String, Tensor> = all_tensors(src.path())
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(stored).unwrap()))
            .collect();
        candle_core::safetensors::save(&converted, dir.path().join("model.safetensors")).unwrap();
        let tol = if stored == DType::BF16 { 5e-2 } else { 5e-3 };
        // Half-precision file, computed in f32.
        let err = relative_error(&logits(dir.path(), DType::F32), &reference);
        assert!(err < tol, "{stored:?} weights in f32: {err}");
        // Half-precision file, computed in its own dtype (bf16 on the CPU too: prefill
        // through candle's bf16 matmul, decode through mesh's matrix-vector path).
        let err = relative_error(&logits(dir.path(), stored), &reference);
        assert!(err < 2.0 * tol, "{stored:?} weights in {stored:?}: {err}");
    }
}
