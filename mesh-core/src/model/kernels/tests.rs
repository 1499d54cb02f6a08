//! The references against the generic op sequence the model runs on the CPU, so "agrees
//! with its reference" means "agrees with the model".

use candle_core::{DType, Device, Tensor, D};

use super::*;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    agreement::seeded(shape, seed, DType::F32).unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    agreement::relative_error(got, want).unwrap()
}

#[test]
fn rms_norm_residual_is_the_add_then_candles_rms_norm() {
    let (x, delta, w) = (rand(&[1, 3, 96], 1), rand(&[1, 3, 96], 2), rand(&[96], 3));
    let (sum, normed) = rms_norm_residual(&x, &delta, &w, 1e-5).unwrap();
    let want_sum = (&x + &delta).unwrap();
    let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
    assert_eq!(rel_err(&sum, &want_sum), 0.0);
    assert!(
        rel_err(&normed, &want) < 1e-6,
        "{}",
        rel_err(&normed, &want)
    );
    // In f16 the reference rounds where the stored ops round.
    let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let (_, normed16) = rms_norm_residual(&h(&x), &h(&delta), &h(&w), 1e-5).unwrap();
    let want16 = candle_nn::ops::rms_norm(&(h(&x) + h(&delta)).unwrap(), &h(&w), 1e-5).unwrap();
    assert!(
        rel_err(&normed16, &want16) < 2e-3,
        "{}",
        rel_err(&normed16, &want16)
    );
}

fn tiny_rope(positions: usize, head_dim: usize) -> rope::RopeTables {
    let mut cfg = crate::model::tiny::config();
    cfg.max_position_embeddings = positions;
    cfg.num_attention_heads = cfg.hidden_size / head_dim;
    cfg.num_key_value_heads = Some(cfg.num_attention_heads);
    cfg.head_dim = Some(head_dim);
    rope::RopeTables::new(&cfg, DType::F32, &Device::Cpu).unwrap()
}

use crate::model::rope;

#[test]
fn rope_q_and_kv_append_rotate_as_the_model_does_and_land_at_their_position() {
    let (heads, kv_heads, hd, max_len) = (8, 2, 16, 12);
    let tables = tiny_rope(64, hd);
    let packed = tables.packed_f32().unwrap();
    for pos in [0, 5, 11] {
        let qkv = rand(&[1, 1, (heads + 2 * kv_heads) * hd], 10 + pos as u64);
        let q = qkv.narrow(D::Minus1, 0, heads * hd).unwrap();
        let as_heads =
            |t: &Tensor, n: usize| t.reshape((1, 1, n, hd)).unwrap().transpose(1, 2).unwrap();
        let want_q = tables
            .apply(&as_heads(&q, heads), pos)
            .unwrap()
            .reshape((heads, hd))
            .unwrap();
        let got_q = rope_q(&qkv, &packed, pos, heads, hd).unwrap();
        assert!(
            rel_err(&got_q, &want_q) < 1e-6,
            "pos {pos}: {}",
            rel_err(&got_q, &want_q)
        );

        let cache = Tensor::zeros((2, kv_heads, max_len, hd), DType::F32, &Device::Cpu).unwrap();
        kv_append(&cache, &qkv, &packed, pos, heads).unwrap();
        let k = qkv.narrow(D::Minus1, heads * hd, kv_heads * hd).unwrap();
        let v = qkv
            .narrow(D::Minus1, (heads + kv_heads) * hd, kv_heads * hd)
            .unwrap();
        let want_k = tables
            .apply(&as_heads(&k, kv_heads), pos)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want_v = as_heads(&v, kv_heads).squeeze(0).unwrap();
        let at = |i: usize| cache.get(i).unwrap().narrow(1, pos, 1).unwrap();
        assert!(rel_err(&at(0), &want_k) < 1e-6);
        assert_eq!(rel_err(&at(1), &want_v), 0.0);
        // Nothing else was written.
        let total = cache
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let here = (at(0).abs().unwrap().sum_all().unwrap()
            + at(1).abs().unwrap().sum_all().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!((total - here).abs() < 1e-4);
    }
    let full = Tensor::zeros((2, kv_heads, max_len, hd), DType::F32, &Device::Cpu).unwrap();
    let qkv = rand(&[(heads + 2 * kv_heads) * hd], 0);
    assert!(
        kv_append(&full, &qkv, &packed, max_len, heads).is_err(),
        "past the end"
    );
}

#[test]
fn gqa_decode_attention_is_softmax_attention_over_repeated_kv_heads() {
    let (heads, kv_heads, hd, max_len, len) = (8, 2, 16, 40, 33);
    let q = rand(&[heads, hd], 7);
    let cache = rand(&[2, kv_heads, max_len, hd], 8);
    let scale = 1.0 / (hd as f32).sqrt();
    let got = gqa_decode_attention(&q, &cache, len, scale).unwrap();
    // The generic path: repeat each kv head for its group, softmax(q k^T * scale) v.
    let group = heads / kv_heads;
    let repeat = |t: Tensor| {
        t.narrow(1, 0, len)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .expand((kv_heads, group, len, hd))
            .unwrap()
            .reshape((heads, len, hd))
            .unwrap()
    };
    let (k, v) = (repeat(cache.get(0).unwrap()), repeat(cache.get(1).unwrap()));
    let scores = (q.unsqueeze(1).unwrap().matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    let want = probs.matmul(&v).unwrap().squeeze(1).unwrap();
    assert!(rel_err(&got, &want) < 1e-5, "{}", rel_err(&got, &want));
    assert!(gqa_decode_attention(&q, &cache, max_len + 1, scale).is_err());
    assert!(gqa_decode_attention(&q, &cache, 0, scale).is_err());
}

#[test]
fn swiglu_is_silu_of_the_gate_times_the_up_half() {
    let gate_up = rand(&[1, 2, 2 * 40], 9);
    let got = swiglu(&gate_up).unwrap();
    let gate = gate_up.narrow(D::Minus1, 0, 40).unwrap();
    let up = gate_up.narrow(D::Minus1, 40, 40).unwrap();
    let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
    assert_eq!(got.dims(), [1, 2, 40]);
    assert!(rel_err(&got, &want) < 1e-6, "{}", rel_err(&got, &want));
}

#[test]
fn supported_shapes_are_the_built_instances() {
    assert!(fused_decode_supported(32, 8, 128)); // Llama-3-8B
    assert!(fused_decode_supported(32, 4, 64)); // TinyLlama-1.1B
    assert!(fused_decode_supported(8, 2, 16)); // the tiny test model
    assert!(!fused_decode_supported(64, 4, 128)); // 16 per group: no instance
    assert!(!fused_decode_supported(32, 8, 80));
    assert!(!fused_decode_supported(30, 8, 64));
}

#[test]
fn the_agreement_harness_passes_on_the_cpu_where_op_and_reference_are_one() {
    use super::agreement::{check, KernelShape};
    for dtype in [DType::F32, DType::F16] {
        let rows = check(&Device::Cpu, KernelShape::TINY, dtype).unwrap();
        assert_eq!(rows.len(), 6);
        for row in rows {
            assert!(row.passed() && row.rel_err == 0.0, "{row:?}");
        }
    }
}
