use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module};
use rand::{Rng, SeedableRng};

use super::simd::{self, Elems, Isa};
use super::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// `w` rounded to f16 and to bf16, as their bits.
fn halves(w: &[f32]) -> (Vec<u16>, Vec<u16>) {
    let f16 = w.iter().map(|&v| half::f16::from_f32(v).to_bits());
    let bf16 = w.iter().map(|&v| half::bf16::from_f32(v).to_bits());
    (f16.collect(), bf16.collect())
}

/// Every vector path against the portable reference, for every weight type, with row
/// counts and widths that leave remainders (rows not a multiple of 4, widths not of 16).
#[test]
fn every_isa_matches_the_portable_reference() {
    for (rows, cols) in [
        (1, 1),
        (3, 7),
        (4, 16),
        (13, 40),
        (6, 64),
        (64, 128),
        (37, 517),
    ] {
        let w = random(rows * cols, 1);
        let x = random(cols, 2);
        let (f16, bf16) = halves(&w);
        for elems in [Elems::F32(&w), Elems::F16(&f16), Elems::Bf16(&bf16)] {
            let mut want = vec![0f32; rows];
            simd::portable_rows(elems, 0, &x, &mut want);
            for isa in Isa::available() {
                // All rows at once, and the rows from 1 on (an offset first row).
                let mut got = vec![0f32; rows];
                simd::dot_rows(isa, elems, 0, &x, &mut got);
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-5, "{isa:?} {rows}x{cols} {elems:?}: {err}");
                let mut tail = vec![0f32; rows - 1];
                simd::dot_rows(isa, elems, 1, &x, &mut tail);
                assert!(max_rel_err(&tail, &want[1..]) < 1e-5, "{isa:?} offset");
            }
        }
    }
}

/// Four inputs at once give exactly what each gives alone, on every path and weight type,
/// from an offset row, with row counts and widths that leave remainders: batched decode
/// must not change a session's numbers.
#[test]
fn four_inputs_at_once_are_each_input_alone_bit_for_bit() {
    for (rows, cols) in [
        (1, 1),
        (3, 7),
        (5, 16),
        (13, 40),
        (9, 64),
        (6, 100),
        (37, 517),
    ] {
        let w = random((rows + 1) * cols, 3);
        let xs: Vec<Vec<f32>> = (0..4).map(|q| random(cols, 10 + q)).collect();
        let (f16, bf16) = halves(&w);
        for elems in [Elems::F32(&w), Elems::F16(&f16), Elems::Bf16(&bf16)] {
            for isa in Isa::available() {
                let alone: Vec<Vec<f32>> = xs
                    .iter()
                    .map(|x| {
                        let mut out = vec![0f32; rows];
                        simd::dot_rows(isa, elems, 1, x, &mut out);
                        out
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = (0..4).map(|_| vec![0f32; rows]).collect();
                let [o0, o1, o2, o3] = &mut outs[..] else {
                    unreachable!("four outputs")
                };
                let x = |q: usize| xs[q].as_slice();
                simd::dot_rows_4(isa, elems, 1, [x(0), x(1), x(2), x(3)], [o0, o1, o2, o3]);
                for q in 0..4 {
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&outs[q]),
                        bits(&alone[q]),
                        "{isa:?} {rows}x{cols} {elems:?} input {q}"
                    );
                }
            }
        }
    }
}

/// The reference itself against plain f64 sums.
#[test]
fn the_reference_is_a_dot_product() {
    let (rows, cols) = (5, 33);
    let (w, x) = (random(rows * cols, 3), random(cols, 4));
    let mut got = vec![0f32; rows];
    simd::portable_rows(Elems::F32(&w), 0, &x, &mut got);
    for (r, g) in got.iter().enumerate() {
        let want: f64 = (0..cols)
            .map(|j| f64::from(w[r * cols + j]) * f64::from(x[j]))
            .sum();
        assert!((f64::from(*g) - want).abs() < 1e-5, "row {r}");
    }
}

/// `Dense` on one row (the pool's path) against candle's `Linear`, with and without a
/// bias, in each dtype; several rows go to candle unchanged.
#[test]
fn dense_agrees_with_candle_linear() -> Result<(), ModelError> {
    // One product the caller runs alone, one split across the workers.
    let shapes = [(300, 96), (1100, 128)];
    assert!(!super::worth_sharing(300 * 96) && super::worth_sharing(1100 * 128));
    for (out, inp) in shapes {
        dense_agrees_with_candle_linear_at(out, inp)?;
    }
    Ok(())
}

fn dense_agrees_with_candle_linear_at(out: usize, inp: usize) -> Result<(), ModelError> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let w = Tensor::new(random(out * inp, 5), &dev)?
            .reshape((out, inp))?
            .to_dtype(dtype)?;
        let b = Tensor::new(random(out, 6), &dev)?.to_dtype(dtype)?;
        for bias in [None, Some(b)] {
            let dense = Dense::new(w.clone(), bias.clone());
            let linear = Linear::new(w.clone(), bias);
            for rows in [1, 3] {
                let x = Tensor::new(random(rows * inp, 7), &dev)?
                    .reshape((1, rows, inp))?
                    .to_dtype(dtype)?;
                let got = dense.forward(&x)?;
                let want = linear.forward(&x)?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dtype(), dtype);
                let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                let err = max_rel_err(&got, &want);
                assert!(err < bound, "{dtype:?} rows {rows}: {err}");
            }
        }
    }
    Ok(())
}

/// Parts that share an input come back in order, each with its own width.
#[test]
fn forward_many_keeps_each_part() -> Result<(), ModelError> {
    let dev = Device::Cpu;
    let inp = 64;
    let parts: Vec<Dense> = [48usize, 16, 16]
        .iter()
        .enumerate()
        .map(|(i, &rows)| {
            let w = Tensor::new(random(rows * inp, 10 + i as u64), &dev)?.reshape((rows, inp))?;
            Ok(Dense::new(w, None))
        })
        .collect::<Result<_, ModelError>>()?;
    let x = Tensor::new(random(inp, 20), &dev)?.reshape((1, 1, inp))?;
    let refs: Vec<&Dense> = parts.iter().collect();
    let ys = forward_many(&refs, &x)?.ok_or(ModelError::EmptyPrompt)?;
    for (y, part) in ys.iter().zip(&parts) {
        let want = x.broadcast_matmul(&part.weight().t()?)?;
        let err = (y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5);
    }
    Ok(())
}

/// q8_0 rows, as candle quantizes them: every path against the reference, the reference
/// against the dequantized matrix in f64 within a bound computed from the input's rounding
/// (16 bits per block of 32: each row off by at most half a step per weight), and
/// `multiply_rows_quantized` (the pool's split, with a bias) against the same sums; a
/// matrix of other width is refused.
#[test]
fn q8_0_rows_are_the_dequantized_matrix_times_the_input() -> Result<(), ModelError> {
    let shapes = [(1, 32), (5, 64), (13, 96), (70, 512), (300, 512)];
    block_quantized_rows(GgmlDType::Q8_0, &shapes, 32767.0, |_, w| w.abs())
}

/// q4k rows, as candle quantizes them, under the same checks. The input is rounded to 8
/// bits per block of 32, and the rounding multiplies `d·sc·q` (the weight before its min
/// is taken off), at most `d·63·15` for super-block scale `d`.
#[test]
fn q4k_rows_are_the_dequantized_matrix_times_the_input() -> Result<(), ModelError> {
    let shapes = [(1, 256), (5, 512), (13, 768), (70, 512), (300, 512)];
    block_quantized_rows(GgmlDType::Q4K, &shapes, 127.0, |block, _| {
        f64::from(simd::f16_to_f32(u16::from_le_bytes([block[0], block[1]]))) * 63.0 * 15.0
    })
}

/// The checks of the two tests above: `levels` the input's rounding steps per sign,
/// `magnitude(block, w)` a bound on what multiplies the rounded input for a weight `w`
/// in `block` (its bytes).
fn block_quantized_rows(
    dtype: GgmlDType,
    shapes: &[(usize, usize)],
    levels: f64,
    magnitude: impl Fn(&[u8], f64) -> f64,
) -> Result<(), ModelError> {
    let dev = Device::Cpu;
    let (block_values, block_bytes) = (dtype.block_size(), dtype.type_size());
    for &(rows, cols) in shapes {
        let w = Tensor::new(random(rows * cols, 30), &dev)?.reshape((rows, cols))?;
        let q = QTensor::quantize(&w, dtype)?;
        let deq = q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
        let Cow::Borrowed(bytes) = q.data()? else {
            panic!("a CPU QTensor lends its bytes");
        };
        let elems = match dtype {
            GgmlDType::Q8_0 => Elems::Q8_0(bytes),
            _ => Elems::Q4K(bytes),
        };
        assert_eq!(elems.len(), rows * cols);
        let mut widened = vec![0f32; rows * cols];
        simd::widen(elems, 0, &mut widened);
        assert_eq!(widened, deq, "{dtype:?} widened");
        let xs: Vec<Vec<f32>> = (0..4).map(|k| random(cols, 40 + k)).collect();
        let mut want = vec![0f32; rows];
        simd::portable_rows(elems, 0, &xs[0], &mut want);
        let step: Vec<f64> = xs[0]
            .chunks(32)
            .map(|b| f64::from(b.iter().fold(0f32, |m, v| m.max(v.abs()))) / levels)
            .collect();
        for (r, got) in want.iter().enumerate() {
            let w = |j: usize| f64::from(deq[r * cols + j]);
            let block = |j: usize| &bytes[(r * cols + j) / block_values * block_bytes..];
            let exact: f64 = (0..cols).map(|j| w(j) * f64::from(xs[0][j])).sum();
            let bound: f64 = (0..cols)
                .map(|j| {
                    let x = f64::from(xs[0][j]).abs();
                    magnitude(block(j), w(j)) * step[j / 32] / 2.0 + 1e-5 * w(j).abs() * x
                })
                .sum();
            let err = (f64::from(*got) - exact).abs();
            assert!(
                err <= bound,
                "{dtype:?} row {r} of {rows}x{cols}: {err} > {bound}"
            );
        }
        for isa in Isa::available() {
            let mut got = vec![0f32; rows];
            simd::dot_rows(isa, elems, 0, &xs[0], &mut got);
            let err = max_rel_err(&got, &want);
            assert!(err < 1e-5, "{dtype:?} {isa:?} {rows}x{cols}: {err}");
            let mut tail = vec![0f32; rows - 1];
            simd::dot_rows(isa, elems, 1, &xs[0], &mut tail);
            assert_eq!(tail, got[1..], "{dtype:?} {isa:?} offset");
            let mut outs: Vec<Vec<f32>> = (0..4).map(|_| vec![0f32; rows]).collect();
            let [o0, o1, o2, o3] = &mut outs[..] else {
                unreachable!("four outputs")
            };
            let x = |k: usize| xs[k].as_slice();
            simd::dot_rows_4(isa, elems, 0, [x(0), x(1), x(2), x(3)], [o0, o1, o2, o3]);
            for (k, out) in outs.iter().enumerate() {
                let mut alone = vec![0f32; rows];
                simd::dot_rows(isa, elems, 0, &xs[k], &mut alone);
                assert_eq!(out, &alone, "{dtype:?} {isa:?} input {k}");
            }
        }
        let bias = Tensor::new(random(rows, 50), &dev)?;
        let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let outs = multiply_rows_quantized(&[(&q, Some(&bias)), (&q, None)], &inputs)?
            .ok_or(ModelError::EmptyPrompt)?;
        let b = bias.to_vec1::<f32>()?;
        for (k, row) in outs.iter().enumerate() {
            let mut alone = vec![0f32; rows];
            simd::dot_rows(isa(), elems, 0, &xs[k], &mut alone);
            assert_eq!(row[1], alone);
            let biased: Vec<f32> = alone.iter().zip(&b).map(|(a, b)| a + b).collect();
            assert_eq!(row[0], biased);
        }
    }
    let wide = block_values * 2;
    let w = Tensor::new(random(4 * wide, 31), &dev)?.reshape((4, wide))?;
    let q = QTensor::quantize(&w, dtype)?;
    let x = random(block_values, 32);
    assert!(
        multiply_rows_quantized(&[(&q, None)], &[&x])?.is_none(),
        "{dtype:?}: rows of {wide}, input of {block_values}"
    );
    Ok(())
}
