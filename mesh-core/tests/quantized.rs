//! Quantized spans against f32: how far the final hidden state and the logits move, and
//! how often greedy decoding still picks the same token, per quantization. Also the bytes
//! a span takes in each format. Figures are printed (`--nocapture`) for docs/performance.md.

mod common;
use common::{larger_model, relative_error};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{ClientHead, ModelFiles, Quantization, SpanModel};
use mesh_core::BlockRange;

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 128, 64, 7, 200, 31, 5];
const GREEDY: usize = 64;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// f32 greedy continuation of the prompt, token by token through the KV cache.
fn greedy_f32(files: &ModelFiles, head: &ClientHead) -> Vec<u32> {
    let n = files.config.num_blocks();
    let span = SpanModel::load(files, BlockRange::new(0, n), DType::F32, &Device::Cpu).unwrap();
    let mut cache = span.new_cache(PROMPT.len() + GREEDY).unwrap();
    let (mut input, mut pos, mut out) = (PROMPT.to_vec(), 0, Vec::new());
    for _ in 0..GREEDY {
        let hidden = span
            .forward(&mut cache, &head.embed(&input).unwrap(), pos)
            .unwrap();
        pos += input.len();
        let next = argmax(&head.last_logits(&hidden).unwrap());
        out.push(next);
        input = vec![next];
    }
    out
}

/// Final hidden states and logits at every position of `ids`, one prefill through two
/// spans of the model at `quant`.
fn prefill(
    files: &ModelFiles,
    head: &ClientHead,
    ids: &[u32],
    quant: Option<Quantization>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut hidden = head.embed(ids).unwrap();
    for r in BlockRange::even_split(files.config.num_blocks(), 2) {
        let span = SpanModel::load_quantized(files, r, DType::F32, quant, &Device::Cpu).unwrap();
        assert_eq!(span.quantization(), quant.map(|q| q.name()));
        let mut cache = span.new_cache(ids.len()).unwrap();
        hidden = span.forward(&mut cache, &hidden, 0).unwrap();
    }
    let flat: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
    let logits: Tensor = head.logits(&hidden).unwrap().squeeze(0).unwrap();
    (flat, logits.to_vec2().unwrap())
}

struct Quality {
    hidden_err: f32,
    logits_err: f32,
    agreement: usize,
}

/// Teacher-forced on the f32 greedy sequence: the share of its 64 tokens each
/// quantization also ranks first.
fn quality(dir: &Path) -> Vec<(Option<Quantization>, Quality)> {
    let files = ModelFiles::open(dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let greedy = greedy_f32(&files, &head);
    let ids: Vec<u32> = PROMPT
        .iter()
        .chain(&greedy[..GREEDY - 1])
        .copied()
        .collect();
    let (ref_hidden, ref_logits) = prefill(&files, &head, &ids, None);
    let first = PROMPT.len() - 1;
    let mut out = Vec::new();
    for quant in [None, Some(Quantization::Q8_0), Some(Quantization::Q4K)] {
        let (hidden, logits) = prefill(&files, &head, &ids, quant);
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let ref_flat: Vec<f32> = ref_logits.iter().flatten().copied().collect();
        let agreement = (0..GREEDY)
            .filter(|&i| argmax(&logits[first + i]) == greedy[i])
            .count();
        out.push((
            quant,
            Quality {
                hidden_err: relative_error(&hidden, &ref_hidden),
                logits_err: relative_error(&flat, &ref_flat),
                agreement,
            },
        ));
    }
    out
}

fn report(name: &str, rows: &[(Option<Quantization>, Quality)]) {
    for (q, r) in rows {
        eprintln!(
            "quality {name:16} {:5}  hidden rel err {:.2e}  logits rel err {:.2e}  top-1 agreement {}/{GREEDY}",
            q.map_or("f32", |q| q.name()),
            r.hidden_err,
            r.logits_err,
            r.agreement
        );
    }
}

/// Bounds: the measured figures (docs/performance.md) with headroom. Random-weight models
/// amplify error more than trained ones (every block adds noise and nothing is redundant),
/// and candle's quantized matmul also rounds the activations to 8 bits, so these are wider
/// than a trained model needs; a broken path (wrong row layout, a lost bias, a wrong
/// dtype) gives errors near 1 and agreement near chance.
fn check(name: &str, rows: &[(Option<Quantization>, Quality)]) {
    report(name, rows);
    for (q, r) in rows {
        let (max_err, min_agree) = match q {
            None => (1e-6, GREEDY),
            Some(Quantization::Q8_0) => (0.15, GREEDY * 7 / 8),
            Some(Quantization::Q4K) => (0.3, GREEDY * 3 / 4),
        };
        assert!(
            r.logits_err <= max_err && r.hidden_err <= max_err,
            "{name} {q:?}: {:.3e} {:.3e}",
            r.hidden_err,
            r.logits_err
        );
        assert!(
            r.agreement >= min_agree,
            "{name} {q:?}: agreement {}/{GREEDY}",
            r.agreement
        );
    }
}

#[test]
fn quantized_fixtures_stay_close_to_f32() {
    for name in [
        "hf_llama_gqa",
        "hf_llama3_tied",
        "hf_qwen2_tied",
        "hf_mistral",
    ] {
        check(name, &quality(&fixture(name)));
    }
}

#[test]
fn quantized_larger_random_model_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    check("random-256x8", &quality(&larger_model(dir.path())));
}

/// Bytes of blocks 2..4 of the 8-block model, measured as the span copies them.
#[test]
fn a_two_of_eight_block_span_in_each_format() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&larger_model(dir.path())).unwrap();
    let cfg = &files.config;
    let range = BlockRange::new(2, 4);
    let bytes = |dtype, q| {
        SpanModel::load_quantized(&files, range, dtype, q, &Device::Cpu)
            .unwrap()
            .weight_bytes()
    };
    let f32_bytes = bytes(DType::F32, None);
    let f16_bytes = bytes(DType::F16, None);
    let q8 = bytes(DType::F32, Some(Quantization::Q8_0));
    let q4 = bytes(DType::F32, Some(Quantization::Q4K));
    let norms = 2 * 2 * cfg.hidden_size * 4;
    let matrices = 2 * (cfg.block_params() - 2 * cfg.hidden_size);
    assert_eq!(f32_bytes, 2 * cfg.block_params() * 4);
    assert_eq!(f16_bytes, f32_bytes / 2);
    assert_eq!(q8, matrices * 34 / 32 + norms);
    assert_eq!(q4, matrices * 144 / 256 + norms);
    // Sizing (probe, register, start) predicts exactly these bytes before loading.
    let predicted = |q| {
        let format = mesh_core::probe::SpanFormat::of(&files, DType::F32, q);
        mesh_core::probe::span_weight_bytes(cfg, 2, format) as usize
    };
    assert_eq!(predicted(Some(Quantization::Q8_0)), q8);
    assert_eq!(predicted(Some(Quantization::Q4K)), q4);
    assert_eq!(predicted(None), f32_bytes);
    for (name, b) in [
        ("f32", f32_bytes),
        ("f16", f16_bytes),
        ("q8_0", q8),
        ("q4k", q4),
    ] {
        eprintln!(
            "span bytes 2 of 8 blocks (hidden 256, intermediate 768) {name:5} {b:>9}  ({:.2}x less than f16)",
            f16_bytes as f64 / b as f64
        );
    }
    // A q4k span fits about 3.5 times the blocks of an f16 one.
    assert!(f16_bytes as f64 / q4 as f64 > 3.4);
}
