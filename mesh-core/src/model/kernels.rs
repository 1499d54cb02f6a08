//! Fused kernels for the batch-1 decode step: our own CUDA code (`kernels/decode.cu`,
//! launched through cudarc) where candle's generic ops would read the same activations
//! several times or launch several kernels for a few kilobytes of work.
//!
//! Every op runs on both devices: on the CPU it runs the portable reference
//! ([`reference`]), which is what the CUDA kernels are tested against. The model's CPU
//! path does not use these ops; it keeps candle's op sequence, whose agreement with
//! transformers the fixtures pin. On CUDA, decode steps of supported shapes use them
//! ([`fused_decode_supported`]); prefill stays on candle's matrix-matrix path.

pub mod agreement;
pub mod reference;

#[cfg(feature = "cuda")]
mod cuda;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Shape};
use candle_core::{Result, Tensor};

/// Head sizes and query-heads-per-kv-head counts the attention kernel is built for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
pub const ATTENTION_GROUPS: [usize; 4] = [1, 2, 4, 8];

/// Whether the fused decode path has kernels for a model of this shape.
pub fn fused_decode_supported(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && ATTENTION_GROUPS.contains(&(heads / kv_heads))
        && ATTENTION_HEAD_DIMS.contains(&head_dim)
}

/// RMSNorm of `x + delta`, scaled by `weight`, over the last dimension. Returns the new
/// residual stream `x + delta` and the normalised rows, both shaped like `x`.
pub fn rms_norm_residual(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &RmsNormResidual { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Rotate the query heads of one position: `qkv` is a fused q|k|v projection of one token
/// (`heads * head_dim` query values first); returns the rotated queries `[heads, head_dim]`.
pub fn rope_q(
    qkv: &Tensor,
    rope: &Tensor,
    pos: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op2_no_bwd(
        &rope.contiguous()?,
        &RopeQ {
            pos,
            heads,
            head_dim,
        },
    )
}

/// Rotate the keys of one position's fused `qkv` and write them and the values into
/// `cache` (`[2, kv_heads, max_len, head_dim]`, keys then values) at `pos`, in place.
pub fn kv_append(
    cache: &Tensor,
    qkv: &Tensor,
    rope: &Tensor,
    pos: usize,
    heads: usize,
) -> Result<()> {
    let (_, kv_heads, max_len, head_dim) = cache.dims4()?;
    if pos >= max_len {
        candle_core::bail!("kv_append: position {pos} is past the cache's {max_len}");
    }
    cache.inplace_op3(
        &qkv.contiguous()?,
        &rope.contiguous()?,
        &KvAppend {
            pos,
            heads,
            kv_heads,
            head_dim,
            max_len,
        },
    )
}

/// Attention of one position's queries `[heads, head_dim]` over the first `len` positions
/// of `cache`, each kv head serving `heads / kv_heads` query heads; `[heads, head_dim]`.
pub fn gqa_decode_attention(q: &Tensor, cache: &Tensor, len: usize, scale: f32) -> Result<Tensor> {
    let (_, kv_heads, max_len, head_dim) = cache.dims4()?;
    if len == 0 || len > max_len {
        candle_core::bail!("gqa_decode_attention: {len} positions in a cache of {max_len}");
    }
    q.contiguous()?.apply_op2_no_bwd(
        &cache.contiguous()?,
        &GqaDecode {
            kv_heads,
            head_dim,
            max_len,
            len,
            scale,
        },
    )
}

/// `silu(gate) * up` over a fused gate|up projection whose last dimension is `2 * width`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let width = gate_up.dim(candle_core::D::Minus1)? / 2;
    gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu { width })
}

// ---------------------------------------------------------------------------------------
// The ops. CPU forwards run the reference; CUDA forwards live in `kernels/cuda.rs`.

fn cpu_f32(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused kernels take contiguous tensors");
    };
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!(
            "fused kernels take f32, f16 or bf16, not {:?}",
            other.dtype()
        ),
    })
}

fn cpu_store(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        other => candle_core::bail!("fused kernels take f32, f16 or bf16, not {other:?}"),
    })
}

pub(crate) struct RmsNormResidual {
    pub eps: f32,
}

impl CustomOp3 for RmsNormResidual {
    fn name(&self) -> &'static str {
        "mesh-rms-norm-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        delta: &CpuStorage,
        dl: &Layout,
        weight: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != dl.shape() || xl.dims().last() != wl.dims().last() {
            candle_core::bail!(
                "rms_norm_residual: shapes {:?} {:?} {:?}",
                xl.dims(),
                dl.dims(),
                wl.dims()
            );
        }
        let (sum, normed) = reference::rms_norm_residual(
            &cpu_f32(x, xl)?,
            Some(&cpu_f32(delta, dl)?),
            &cpu_f32(weight, wl)?,
            self.eps,
            x.dtype(),
        );
        let both = sum.into_iter().chain(normed).collect();
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((cpu_store(both, x.dtype())?, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        delta: &candle_core::CudaStorage,
        dl: &Layout,
        weight: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm_residual(self, (x, xl), (delta, dl), (weight, wl))
    }
}

pub(crate) struct RopeQ {
    pub pos: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl CustomOp2 for RopeQ {
    fn name(&self) -> &'static str {
        "mesh-rope-q"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        rope: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q_len = self.heads * self.head_dim;
        let qkv_f = cpu_f32(qkv, ql)?;
        if qkv_f.len() < q_len {
            candle_core::bail!("rope_q: {} values hold no {q_len} queries", qkv_f.len());
        }
        let rope = cpu_f32(rope, rl)?;
        check_rope(&rope, self.pos, self.head_dim)?;
        let out =
            reference::rope_rotate(&qkv_f[..q_len], &rope, self.pos, self.head_dim, qkv.dtype());
        Ok((
            cpu_store(out, qkv.dtype())?,
            Shape::from((self.heads, self.head_dim)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        rope: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rope_q(self, (qkv, ql), (rope, rl))
    }
}

fn check_rope(rope: &[f32], pos: usize, head_dim: usize) -> Result<()> {
    if (pos + 1) * head_dim > rope.len() {
        candle_core::bail!("rope table has no position {pos}");
    }
    Ok(())
}

pub(crate) struct KvAppend {
    pub pos: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_len: usize,
}

impl KvAppend {
    fn qkv_len(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

impl InplaceOp3 for KvAppend {
    fn name(&self) -> &'static str {
        "mesh-kv-append"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        qkv: &CpuStorage,
        ql: &Layout,
        rope: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let qkv_f = cpu_f32(qkv, ql)?;
        if qkv_f.len() != self.qkv_len() {
            candle_core::bail!(
                "kv_append: {} values, expected {}",
                qkv_f.len(),
                self.qkv_len()
            );
        }
        let rope = cpu_f32(rope, rl)?;
        check_rope(&rope, self.pos, self.head_dim)?;
        let mut values = cpu_f32(cache, cl)?;
        let q_len = self.heads * self.head_dim;
        let (k, v) = qkv_f[q_len..].split_at(self.kv_heads * self.head_dim);
        let dtype = cache.dtype();
        reference::kv_append(
            &mut values,
            k,
            v,
            &rope,
            self.pos,
            self.max_len,
            self.head_dim,
            dtype,
        );
        let start = cl.start_offset();
        match cache {
            CpuStorage::F32(c) => c[start..start + values.len()].copy_from_slice(&values),
            CpuStorage::F16(c) => c[start..start + values.len()]
                .iter_mut()
                .zip(values)
                .for_each(|(d, s)| *d = half::f16::from_f32(s)),
            CpuStorage::BF16(c) => c[start..start + values.len()]
                .iter_mut()
                .zip(values)
                .for_each(|(d, s)| *d = half::bf16::from_f32(s)),
            other => candle_core::bail!("kv_append: cache of {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        rope: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        cuda::kv_append(self, (cache, cl), (qkv, ql), (rope, rl))
    }
}

pub(crate) struct GqaDecode {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_len: usize,
    pub len: usize,
    pub scale: f32,
}

impl CustomOp2 for GqaDecode {
    fn name(&self) -> &'static str {
        "mesh-gqa-decode"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        cache: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q_f = cpu_f32(q, ql)?;
        let cache_f = cpu_f32(cache, cl)?;
        let out = reference::gqa_decode_attention(
            &q_f,
            &cache_f,
            self.kv_heads,
            self.max_len,
            self.len,
            self.scale,
            q.dtype(),
        );
        let heads = q_f.len() / self.head_dim;
        Ok((
            cpu_store(out, q.dtype())?,
            Shape::from((heads, self.head_dim)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        cache: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gqa_decode(self, (q, ql), (cache, cl))
    }
}

pub(crate) struct SwiGlu {
    pub width: usize,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "mesh-swiglu"
    }

    fn cpu_fwd(&self, gate_up: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = reference::swiglu(&cpu_f32(gate_up, layout)?, self.width, gate_up.dtype());
        Ok((
            cpu_store(out, gate_up.dtype())?,
            swiglu_shape(layout, self.width),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gate_up: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu(self, gate_up, layout, swiglu_shape(layout, self.width))
    }
}

fn swiglu_shape(layout: &Layout, width: usize) -> Shape {
    let mut dims = layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    Shape::from(dims)
}

#[cfg(test)]
mod tests;
