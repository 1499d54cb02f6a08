//! The fused decode path's wiring, checked without a GPU: on the CPU the fused kernels run
//! as their references, so a model with the fused path on must decode what candle's
//! generic ops decode. On a GPU the same path runs our CUDA kernels (`tests/gpu.rs`).

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{tiny, ClientHead, ModelFiles, SpanCache, SpanModel};
use mesh_core::BlockRange;

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    mesh_core::model::kernels::agreement::relative_error(got, want).unwrap()
}

fn step(span: &SpanModel, cache: &mut SpanCache, head: &ClientHead, ids: &[u32]) -> Tensor {
    let start = cache.len();
    span.forward(cache, &head.embed(ids).unwrap(), start)
        .unwrap()
}

#[test]
fn fused_decode_matches_the_generic_ops_step_for_step() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let generic = SpanModel::load(&files, BlockRange::new(0, 8), DType::F32, &Device::Cpu).unwrap();
    let mut fused = generic.clone();
    fused.set_fused_decode(true).unwrap();
    let (mut cg, mut cf) = (generic.new_cache(64).unwrap(), fused.new_cache(64).unwrap());

    // The prompt is a prefill: both take the generic path and fill the same cache layout
    // (the stacked matrix products may sum in another order: last-bit differences).
    let prompt = [1u32, 75, 104, 111, 35, 119, 104, 101];
    let (mut hg, mut hf) = (
        step(&generic, &mut cg, &head, &prompt),
        step(&fused, &mut cf, &head, &prompt),
    );
    assert!(relative_error(&hf, &hg) < 1e-6);
    // Each decode step: the fused path appends into that cache and attends over it.
    for i in 0..24 {
        let lg = head.last_logits(&hg).unwrap();
        let lf = head.last_logits(&hf).unwrap();
        let argmax =
            |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
        assert_eq!(argmax(&lf), argmax(&lg), "step {i}");
        let next = argmax(&lg);
        hg = step(&generic, &mut cg, &head, &[next]);
        hf = step(&fused, &mut cf, &head, &[next]);
        let err = relative_error(&hf, &hg);
        assert!(err < 1e-5, "step {i}: relative error {err}");
    }
    assert_eq!(cf.len(), prompt.len() + 24);
}

#[test]
fn turning_the_fused_path_off_again_gives_the_generic_ops_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let mut span =
        SpanModel::load(&files, BlockRange::new(2, 6), DType::F32, &Device::Cpu).unwrap();
    let x = head.embed(&[1, 2, 3]).unwrap();
    let mut cache = span.new_cache(8).unwrap();
    let want = span.forward(&mut cache, &x, 0).unwrap();
    span.set_fused_decode(true).unwrap();
    span.set_fused_decode(false).unwrap();
    cache.reset();
    // Stacked projections, generic ops: the same numbers as separate matrices.
    let got = span.forward(&mut cache, &x, 0).unwrap();
    assert!(relative_error(&got, &want) < 1e-6);
}
