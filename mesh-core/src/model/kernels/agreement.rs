//! Each fused kernel on a device against its CPU reference, on the same inputs: what the
//! GPU tests assert and what `scripts/gpu-check.sh` prints.

use candle_core::{DType, Device, Tensor};

use super::{gqa_decode_attention, kv_append, rms_norm_residual, rope_q, swiglu};

/// The shape of one decode step the kernels are checked at.
#[derive(Clone, Copy, Debug)]
pub struct KernelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions already in the cache; the attention reads them all.
    pub context: usize,
}

impl KernelShape {
    /// Llama-3-8B's block at a context long enough for several flash-decoding chunks.
    pub const LLAMA3_8B: Self = Self {
        name: "llama3-8b",
        hidden: 4096,
        intermediate: 14336,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        context: 1000,
    };
    /// TinyLlama-1.1B's block (64-wide heads, 8 query heads per kv head).
    pub const TINYLLAMA: Self = Self {
        name: "tinyllama-1.1b",
        hidden: 2048,
        intermediate: 5632,
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
        context: 300,
    };
    /// The embedded tiny model's block (16-wide heads).
    pub const TINY: Self = Self {
        name: "tiny",
        hidden: 128,
        intermediate: 344,
        heads: 8,
        kv_heads: 2,
        head_dim: 16,
        context: 40,
    };
}

/// One kernel's worst relative error against its reference.
#[derive(Clone, Debug)]
pub struct Agreement {
    pub kernel: &'static str,
    pub shape: &'static str,
    pub dtype: DType,
    /// max |got - want| / max |want|.
    pub rel_err: f32,
    pub limit: f32,
}

impl Agreement {
    pub fn passed(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err < self.limit
    }
}

/// The limit the issue sets: f32 within 1e-4, f16/bf16 within 1e-2.
pub fn limit_for(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-4
    } else {
        1e-2
    }
}

/// Largest absolute difference over the largest magnitude of `want`.
pub fn relative_error(got: &Tensor, want: &Tensor) -> candle_core::Result<f32> {
    let got = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let want = want
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    if got.dims() != want.dims() {
        candle_core::bail!("shapes differ: {:?} against {:?}", got.dims(), want.dims());
    }
    let diff = (&got - &want)?.abs()?.max(0)?.to_scalar::<f32>()?;
    let scale = want.abs()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

/// Seeded uniform values in `[-1, 1)`, made on the CPU in `dtype`.
pub(super) fn seeded(shape: &[usize], seed: u64, dtype: DType) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// A rope table like [`crate::model::rope::RopeTables::packed`] for `positions`.
fn rope_table(positions: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let half = head_dim / 2;
    let mut data = Vec::with_capacity(positions * head_dim);
    for p in 0..positions {
        let angles: Vec<f32> = (0..half)
            .map(|i| p as f32 / 10_000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        data.extend(angles.iter().map(|a| a.cos()));
        data.extend(angles.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(data, (positions, 2, half), &Device::Cpu)
}

/// Run every kernel at `shape` in `dtype` on `device` and on the CPU reference.
pub fn check(
    device: &Device,
    shape: KernelShape,
    dtype: DType,
) -> candle_core::Result<Vec<Agreement>> {
    let s = shape;
    let on = |t: &Tensor| t.to_device(device);
    let mut out = Vec::new();
    let mut record = |kernel, got: &Tensor, want: &Tensor| -> candle_core::Result<()> {
        out.push(Agreement {
            kernel,
            shape: s.name,
            dtype,
            rel_err: relative_error(got, want)?,
            limit: limit_for(dtype),
        });
        Ok(())
    };

    let (x, delta, w) = (
        seeded(&[1, 1, s.hidden], 1, dtype)?,
        seeded(&[1, 1, s.hidden], 2, dtype)?,
        seeded(&[s.hidden], 3, dtype)?,
    );
    let (sum, normed) = rms_norm_residual(&on(&x)?, &on(&delta)?, &on(&w)?, 1e-5)?;
    let (want_sum, want_normed) = rms_norm_residual(&x, &delta, &w, 1e-5)?;
    record("rms_norm+residual (sum)", &sum, &want_sum)?;
    record("rms_norm+residual (norm)", &normed, &want_normed)?;

    let max_len = s.context + 24;
    let rope = rope_table(max_len, s.head_dim)?;
    let qkv = seeded(&[1, 1, (s.heads + 2 * s.kv_heads) * s.head_dim], 4, dtype)?;
    let pos = s.context - 1;
    record(
        "rope (q)",
        &rope_q(&on(&qkv)?, &on(&rope)?, pos, s.heads, s.head_dim)?,
        &rope_q(&qkv, &rope, pos, s.heads, s.head_dim)?,
    )?;
    // A cache full of earlier positions, then this step's keys and values appended.
    let cache = seeded(&[2, s.kv_heads, max_len, s.head_dim], 5, dtype)?;
    let gpu_cache = on(&cache)?;
    kv_append(&gpu_cache, &on(&qkv)?, &on(&rope)?, pos, s.heads)?;
    kv_append(&cache, &qkv, &rope, pos, s.heads)?;
    record("rope+kv append (cache)", &gpu_cache, &cache)?;

    let q = seeded(&[s.heads, s.head_dim], 6, dtype)?;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    record(
        "gqa decode attention",
        &gqa_decode_attention(&on(&q)?, &gpu_cache, s.context, scale)?,
        &gqa_decode_attention(&q, &cache, s.context, scale)?,
    )?;

    let gate_up = seeded(&[1, 1, 2 * s.intermediate], 7, dtype)?;
    record("swiglu", &swiglu(&on(&gate_up)?)?, &swiglu(&gate_up)?)?;
    Ok(out)
}
