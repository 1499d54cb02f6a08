//! The CPU decode step (`model/layers/cpu_step.rs` with `model/matvec`) against candle's
//! generic ops, step for step, in each dtype a span can hold.
//!
//! The matrix-vector path is switched for the whole process, so this file holds one test.

mod common;

use candle_core::{DType, Device, Tensor};
use mesh_core::model::kernels::agreement::relative_error;
use mesh_core::model::{matvec, tiny, ClientHead, ModelFiles, Quantization, SpanModel};
use mesh_core::BlockRange;

const STEPS: usize = 32;

/// Hidden states of a prompt and `STEPS` greedy decode steps, and the tokens chosen; or,
/// given `follow` (another run's tokens), the steps of those tokens.
fn decode(
    files: &ModelFiles,
    dtype: DType,
    quant: Option<Quantization>,
    cpu_step: bool,
    follow: Option<&[u32]>,
) -> (Vec<Tensor>, Vec<u32>) {
    matvec::set_enabled(cpu_step);
    let head = ClientHead::load(files, DType::F32, &Device::Cpu).unwrap();
    let range = BlockRange::new(0, 8);
    let span = SpanModel::load_quantized(files, range, dtype, quant, &Device::Cpu).unwrap();
    let mut cache = span.new_cache(64).unwrap();
    let mut ids = vec![1u32, 75, 104, 111, 35, 119, 104, 101];
    let mut hidden = Vec::new();
    for _ in 0..=STEPS {
        let input = if hidden.is_empty() {
            &ids[..]
        } else {
            &ids[ids.len() - 1..]
        };
        let start = cache.len();
        let x = head.embed(input).unwrap().to_dtype(dtype).unwrap();
        let h = span.forward(&mut cache, &x, start).unwrap();
        let h = h.to_dtype(DType::F32).unwrap();
        let logits = head.last_logits(&h).unwrap();
        let next = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        hidden.push(h.narrow(1, h.dim(1).unwrap() - 1, 1).unwrap());
        ids.push(follow.map_or(next, |f| f[ids.len()]));
    }
    matvec::set_enabled(true);
    (hidden, ids)
}

#[test]
fn the_cpu_step_decodes_what_the_generic_ops_decode() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();

    // f32: the same tokens, and hidden states equal but for the order of the sums.
    let (generic, generic_ids) = decode(&files, DType::F32, None, false, None);
    let (fast, fast_ids) = decode(&files, DType::F32, None, true, None);
    assert_eq!(fast_ids, generic_ids);
    for (i, (f, g)) in fast.iter().zip(&generic).enumerate() {
        let err = relative_error(f, g).unwrap();
        assert!(err < 1e-5, "f32 step {i}: relative error {err}");
    }

    // f16 and bf16: the generic ops round every intermediate to the dtype, the CPU step
    // sums in f32, so each is held to f32 (the reference) instead: the CPU step must be
    // no further from it than the generic ops are, give or take a quarter.
    for dtype in [DType::F16, DType::BF16] {
        let (half_generic, _) = decode(&files, dtype, None, false, None);
        let (half_fast, _) = decode(&files, dtype, None, true, None);
        // Along their own tokens, which follow f32's at first: the prefill and the first
        // three steps.
        let worst = |run: &[Tensor]| worst(&run[..4], &generic);
        let (err_generic, err_fast) = (worst(&half_generic), worst(&half_fast));
        eprintln!("{dtype:?}: vs f32, generic ops {err_generic:.2e}, cpu step {err_fast:.2e}");
        assert!(
            err_fast <= err_generic * 1.25,
            "{dtype:?}: cpu step {err_fast} vs generic {err_generic}"
        );
    }

    // q8_0 and q4k, on a model 256 wide (whole q4k super-blocks everywhere), every step
    // along f32's tokens: candle's kernels round the input to 8 bits (per 32 for q8_0,
    // per 256 for q4k), the CPU step to 16 bits per 32 for q8_0 and 8 bits per 32 for
    // q4k. Each must stay as close to f32 as candle's kernels do, give or take a quarter.
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&common::larger_model(dir.path())).unwrap();
    let (reference, ids) = decode(&files, DType::F32, None, false, None);
    for quant in [Quantization::Q8_0, Quantization::Q4K] {
        let (generic, _) = decode(&files, DType::F32, Some(quant), false, Some(&ids));
        let (fast, _) = decode(&files, DType::F32, Some(quant), true, Some(&ids));
        let (err_generic, err_fast) = (worst(&generic, &reference), worst(&fast, &reference));
        eprintln!("{quant}: vs f32, candle's kernels {err_generic:.2e}, cpu step {err_fast:.2e}");
        assert!(
            err_fast <= err_generic * 1.25,
            "{quant}: cpu step {err_fast} vs candle {err_generic}"
        );
    }
}

/// The largest relative error of `run`'s hidden states against `reference`'s.
fn worst(run: &[Tensor], reference: &[Tensor]) -> f32 {
    run.iter()
        .zip(reference)
        .map(|(h, r)| relative_error(h, r).unwrap())
        .fold(0f32, f32::max)
}
