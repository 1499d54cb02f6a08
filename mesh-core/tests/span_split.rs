//! Splitting the model into spans must not change a single logit.

mod common;
use common::relative_error;

use candle_core::{DType, Device};
use mesh_core::model::{tiny, ClientHead, ModelFiles, SpanModel};
use mesh_core::BlockRange;

const PROMPT: &[u32] = &[1, 72, 101, 108, 108, 111, 44, 32, 109, 101, 115, 104];
const DECODE_STEPS: usize = 24;

/// Logits of the last position after the prefill and after each of `DECODE_STEPS`
/// greedy steps, running the blocks as `ranges`.
fn step_logits(files: &ModelFiles, head: &ClientHead, ranges: &[BlockRange]) -> Vec<Vec<f32>> {
    let spans: Vec<SpanModel> = ranges
        .iter()
        .map(|r| SpanModel::load(files, *r, DType::F32, &Device::Cpu).unwrap())
        .collect();
    let mut caches: Vec<_> = spans.iter().map(|s| s.new_cache(128).unwrap()).collect();
    let mut input = PROMPT.to_vec();
    let mut pos = 0;
    let mut all = Vec::new();
    for _ in 0..=DECODE_STEPS {
        let mut hidden = head.embed(&input).unwrap();
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            hidden = span.forward(cache, &hidden, pos).unwrap();
        }
        let logits = head.last_logits(&hidden).unwrap();
        pos += input.len();
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        input = vec![next];
        all.push(logits);
    }
    all
}

#[test]
fn any_split_gives_the_unsplit_logits_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let files = ModelFiles::open(dir.path()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let n = files.config.num_blocks();
    assert_eq!(n, 8);
    let reference = step_logits(&files, &head, &[BlockRange::new(0, n)]);
    assert_eq!(reference.len(), DECODE_STEPS + 1);

    let r = BlockRange::new;
    let splits: Vec<Vec<BlockRange>> = vec![
        BlockRange::even_split(n, 2),
        vec![r(0, 1), r(1, 8)],
        BlockRange::even_split(n, 3),
        vec![r(0, 5), r(5, 6), r(6, 8)],
        BlockRange::even_split(n, 4),
        vec![r(0, 1), r(1, 2), r(2, 7), r(7, 8)],
    ];
    for ranges in splits {
        let got = step_logits(&files, &head, &ranges);
        for (step, (g, want)) in got.iter().zip(&reference).enumerate() {
            let err = relative_error(g, want);
            assert!(
                err <= 1e-5,
                "split {ranges:?}, step {step}: relative error {err}"
            );
        }
    }
}

#[test]
fn prefill_equals_token_by_token_decoding() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let files = ModelFiles::open(dir.path()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let span = SpanModel::load(&files, BlockRange::new(0, 8), DType::F32, &Device::Cpu).unwrap();

    let mut prefill_cache = span.new_cache(64).unwrap();
    let hidden = span
        .forward(&mut prefill_cache, &head.embed(PROMPT).unwrap(), 0)
        .unwrap();
    let prefill = head.last_logits(&hidden).unwrap();

    let mut step_cache = span.new_cache(64).unwrap();
    let mut last = Vec::new();
    for (pos, &tok) in PROMPT.iter().enumerate() {
        let hidden = span
            .forward(&mut step_cache, &head.embed(&[tok]).unwrap(), pos)
            .unwrap();
        last = head.last_logits(&hidden).unwrap();
    }
    assert_eq!(step_cache.len(), PROMPT.len());
    let err = relative_error(&last, &prefill);
    assert!(err <= 1e-5, "relative error {err}");
}

#[test]
fn a_quarter_span_loads_a_quarter_of_the_block_weights() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let files = ModelFiles::open(dir.path()).unwrap();
    let load = |r| {
        SpanModel::load(&files, r, DType::F32, &Device::Cpu)
            .unwrap()
            .weight_bytes()
    };
    let whole = load(BlockRange::new(0, 8));
    let quarters: Vec<usize> = BlockRange::even_split(8, 4).into_iter().map(load).collect();
    let expected_block_bytes = files.config.block_params() * 4;
    assert_eq!(whole, 8 * expected_block_bytes);
    for q in &quarters {
        assert_eq!(*q * 4, whole, "each quarter holds exactly 2 of 8 blocks");
    }
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let file_bytes = std::fs::metadata(&files.weight_files[0]).unwrap().len() as usize;
    // Blocks + head are everything in the file (bar the safetensors header).
    assert!(whole + head.weight_bytes() <= file_bytes);
    assert!(file_bytes - (whole + head.weight_bytes()) < 64 * 1024);
}
