//! Decode steps of several sessions as one pass (`SpanModel::forward_decode_batch`, what a
//! server runs for the steps that queue together) against each step alone: the same
//! numbers, bit for bit, in each dtype, sessions at different positions.

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{tiny, ClientHead, ModelFiles, SpanCache, SpanModel};
use mesh_core::BlockRange;

const SESSIONS: usize = 5;
const STEPS: usize = 6;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// `SESSIONS` caches on `range`, each after a prompt of a different length.
fn prefilled(
    span: &SpanModel,
    head: &ClientHead,
    range: BlockRange,
    dtype: DType,
) -> Vec<SpanCache> {
    (0..SESSIONS)
        .map(|s| {
            let mut cache = span.new_sub_cache(range, 64).unwrap();
            let prompt: Vec<u32> = (0..3 + 2 * s as u32)
                .map(|i| 1 + (i * 37 + s as u32 * 11) % 250)
                .collect();
            let x = head.embed(&prompt).unwrap().to_dtype(dtype).unwrap();
            span.forward(&mut cache, &x, 0).unwrap();
            cache
        })
        .collect()
}

#[test]
fn a_batch_of_decode_steps_is_each_step_alone() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let span = SpanModel::load(&files, BlockRange::new(0, 8), dtype, &Device::Cpu).unwrap();
        for range in [BlockRange::new(0, 8), BlockRange::new(2, 5)] {
            let mut alone = prefilled(&span, &head, range, dtype);
            let mut together = prefilled(&span, &head, range, dtype);
            for step in 0..STEPS {
                let inputs: Vec<Tensor> = (0..SESSIONS)
                    .map(|s| {
                        let token = 1 + ((step * 53 + s * 19) % 250) as u32;
                        head.embed(&[token]).unwrap().to_dtype(dtype).unwrap()
                    })
                    .collect();
                let want: Vec<Tensor> = alone
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(cache, x)| {
                        let pos = cache.len();
                        span.forward(cache, x, pos).unwrap()
                    })
                    .collect();
                let mut steps: Vec<(&mut SpanCache, &Tensor)> =
                    together.iter_mut().zip(&inputs).collect();
                let got = span.forward_decode_batch(&mut steps);
                for (s, (got, want)) in got.into_iter().zip(&want).enumerate() {
                    let got = got.unwrap();
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(got.dtype(), want.dtype());
                    assert!(
                        bits(&got) == bits(want),
                        "{dtype:?} {range} session {s} step {step}: batched differs from alone"
                    );
                }
                for (a, t) in alone.iter().zip(&together) {
                    assert_eq!(a.len(), t.len());
                }
            }
        }
    }
}

/// Steps that cannot share a pass (sessions on different blocks, a step at the end of its
/// cache) still get their own answers: the others' results, and its own error.
#[test]
fn steps_that_cannot_share_a_pass_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let span = SpanModel::load(&files, BlockRange::new(0, 8), DType::F32, &Device::Cpu).unwrap();
    let mut whole = span.new_cache(8).unwrap();
    let mut part = span.new_sub_cache(BlockRange::new(3, 8), 8).unwrap();
    let mut full = span.new_cache(1).unwrap();
    let x = head.embed(&[5]).unwrap();
    span.forward(&mut full, &x, 0).unwrap();
    let mut steps: Vec<(&mut SpanCache, &Tensor)> =
        vec![(&mut whole, &x), (&mut part, &x), (&mut full, &x)];
    let got = span.forward_decode_batch(&mut steps);
    assert!(got[0].is_ok() && got[1].is_ok());
    assert!(got[2].is_err(), "a full cache takes no step");
    assert_eq!((whole.len(), part.len(), full.len()), (1, 1, 1));
}
