//! Broken model directories and impossible requests give typed errors, never panics.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{
    tiny, ClientHead, Generation, ModelError, ModelFiles, SamplingParams, SpanModel,
};
use mesh_core::BlockRange;

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    dir
}

/// Replace one tensor of the tiny model's safetensors file.
fn rewrite_tensor(dir: &std::path::Path, name: &str, tensor: Tensor) {
    let path = dir.join("model.safetensors");
    let mut all: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    all.insert(name.to_string(), tensor);
    candle_core::safetensors::save(&all, &path).unwrap();
}

fn load_all(dir: &std::path::Path) -> Result<SpanModel, ModelError> {
    let files = ModelFiles::open(dir)?;
    let n = files.config.num_blocks();
    SpanModel::load(&files, BlockRange::new(0, n), DType::F32, &Device::Cpu)
}

#[test]
fn missing_config_is_an_io_error() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = ModelFiles::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::Io { ref path, .. } if path.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn malformed_config_names_the_problem() {
    let dir = tiny_dir();
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let err = ModelFiles::open(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MalformedConfig { .. }), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        "{\"hidden_size\": \"wide\"}",
    )
    .unwrap();
    let err = ModelFiles::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("hidden_size") || err.to_string().contains("invalid type"),
        "{err}"
    );
}

#[test]
fn missing_weights_are_reported() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        ModelFiles::open(dir.path()),
        Err(ModelError::NoWeights(_))
    ));
}

#[test]
fn corrupt_safetensors_is_reported() {
    let dir = tiny_dir();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    )
    .unwrap();
    let err = load_all(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::BadSafetensors { .. }), "{err}");
}

#[test]
fn wrong_shape_is_reported_with_both_shapes() {
    let dir = tiny_dir();
    let name = "model.layers.2.mlp.up_proj.weight";
    rewrite_tensor(
        dir.path(),
        name,
        Tensor::zeros((7, 128), DType::F32, &Device::Cpu).unwrap(),
    );
    match load_all(dir.path()).unwrap_err() {
        ModelError::WeightShape {
            name: n,
            expected,
            actual,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![344, 128]);
            assert_eq!(actual, vec![7, 128]);
        }
        other => panic!("unexpected {other}"),
    }
    // A span that does not include block 2 does not even read that tensor.
    let files = ModelFiles::open(dir.path()).unwrap();
    SpanModel::load(&files, BlockRange::new(3, 8), DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn integer_weights_are_rejected() {
    let dir = tiny_dir();
    let name = "model.layers.0.self_attn.q_proj.weight";
    rewrite_tensor(
        dir.path(),
        name,
        Tensor::zeros((128, 128), DType::I64, &Device::Cpu).unwrap(),
    );
    let err = load_all(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::WeightDtype { .. }), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tiny_dir();
    let files = ModelFiles::open(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let mut all: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    all.remove("model.norm.weight");
    candle_core::safetensors::save(&all, &path).unwrap();
    let err = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingWeight { ref name } if name == "model.norm.weight"),
        "{err}"
    );
}

#[test]
fn span_out_of_range() {
    let dir = tiny_dir();
    let files = ModelFiles::open(dir.path()).unwrap();
    for r in [
        BlockRange::new(6, 9),
        BlockRange::new(4, 4),
        BlockRange::new(5, 2),
    ] {
        let err = SpanModel::load(&files, r, DType::F32, &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, ModelError::SpanOutOfRange { num_blocks: 8, .. }),
            "{err}"
        );
    }
}

#[test]
fn prompt_longer_than_context() {
    let err = Generation::new(vec![5; 600], SamplingParams::greedy(4), 512).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                requested: 601,
                max: 512
            }
        ),
        "{err}"
    );

    let dir = tiny_dir();
    let files = ModelFiles::open(dir.path()).unwrap();
    let span = SpanModel::load(&files, BlockRange::new(0, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        span.new_cache(10_000),
        Err(ModelError::ContextOverflow { .. })
    ));
    let mut cache = span.new_cache(4).unwrap();
    let hidden = Tensor::zeros((1, 5, 128), DType::F32, &Device::Cpu).unwrap();
    let err = span.forward(&mut cache, &hidden, 0).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                requested: 5,
                max: 4
            }
        ),
        "{err}"
    );
}

#[test]
fn hidden_states_must_fit_the_session() {
    let dir = tiny_dir();
    let files = ModelFiles::open(dir.path()).unwrap();
    let span = SpanModel::load(&files, BlockRange::new(0, 2), DType::F32, &Device::Cpu).unwrap();
    let mut cache = span.new_cache(32).unwrap();
    let wrong_width = Tensor::zeros((1, 2, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        span.forward(&mut cache, &wrong_width, 0),
        Err(ModelError::HiddenShape { .. })
    ));
    let ok = Tensor::zeros((1, 2, 128), DType::F32, &Device::Cpu).unwrap();
    let err = span.forward(&mut cache, &ok, 5).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::PositionMismatch {
                expected: 0,
                got: 5
            }
        ),
        "{err}"
    );
}
