//! mesh against an implementation nobody here wrote: Hugging Face transformers'
//! `LlamaForCausalLM`. The fixtures and the script that made them are committed
//! (`scripts/make_hf_fixture.py`, `tests/fixtures/README.md`); no Python runs here.

mod common;
use common::relative_error;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{ClientHead, LocalModel, ModelFiles, SamplingParams, SpanModel};
use mesh_core::BlockRange;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Expected {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

fn expected(dir: &Path) -> Expected {
    let t = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        t[name]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    Expected {
        input_ids: ids("input_ids"),
        logits: t["logits"].to_vec2::<f32>().unwrap(),
        greedy_ids: ids("greedy_ids"),
    }
}

/// Logits at every prompt position from one prefill through `ranges`.
fn prompt_logits(dir: &Path, ranges: &[BlockRange], ids: &[u32]) -> Vec<Vec<f32>> {
    let files = ModelFiles::open(dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let mut hidden: Tensor = head.embed(ids).unwrap();
    for r in ranges {
        let span = SpanModel::load(&files, *r, DType::F32, &Device::Cpu).unwrap();
        let mut cache = span.new_cache(64).unwrap();
        hidden = span.forward(&mut cache, &hidden, 0).unwrap();
    }
    head.logits(&hidden)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let want = expected(&dir);
    let n = ModelFiles::open(&dir).unwrap().config.num_blocks();
    let mut worst = 0f32;
    for parts in 1..=n {
        let ranges = BlockRange::even_split(n, parts);
        let got = prompt_logits(&dir, &ranges, &want.input_ids);
        assert_eq!(got.len(), want.logits.len());
        for (pos, (g, w)) in got.iter().zip(&want.logits).enumerate() {
            let err = relative_error(g, w);
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{name}, {parts} spans, position {pos}: relative error {err}"
            );
        }
    }
    eprintln!("{name}: worst relative error against transformers {worst:.2e}");
    // Greedy decoding with the KV cache reproduces transformers' generate().
    let model = LocalModel::load_split(&dir, 2.min(n), &Device::Cpu).unwrap();
    let generation = model
        .generate_ids(
            want.input_ids.clone(),
            &SamplingParams::greedy(want.greedy_ids.len()),
            |_| {},
        )
        .unwrap();
    assert_eq!(generation.generated(), want.greedy_ids.as_slice(), "{name}");
}

#[test]
fn gqa_model_matches_transformers() {
    check_fixture("hf_llama_gqa");
}

#[test]
fn tied_llama3_rope_model_matches_transformers() {
    check_fixture("hf_llama3_tied");
}

#[test]
fn hub_legacy_config_layout_gives_the_same_logits() {
    let src = fixture("hf_llama3_tied");
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "expected.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        src.join("config.hub_legacy.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let want = expected(dir.path());
    let got = prompt_logits(dir.path(), &[BlockRange::new(0, 2)], &want.input_ids);
    for (g, w) in got.iter().zip(&want.logits) {
        assert!(relative_error(g, w) < 1e-4);
    }
}

#[test]
fn qwen2_with_qkv_biases_and_tied_embeddings_matches_transformers() {
    check_fixture("hf_qwen2_tied");
}

#[test]
fn mistral_matches_transformers() {
    check_fixture("hf_mistral");
}
