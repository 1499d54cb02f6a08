//! Launching the kernels of `decode.cu` on candle's CUDA storage through cudarc.
//!
//! The PTX is built by `mesh-core/build.rs` with nvcc when the `cuda` feature is on and
//! loaded once per device as a custom module.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use super::{GqaDecode, KvAppend, RmsNormResidual, RopeQ, SwiGlu};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "mesh_decode";

/// Threads per block of the attention kernel (`ATTN_WARPS` in decode.cu).
const ATTENTION_THREADS: u32 = 128;
/// Positions one attention block covers at least; more positions add blocks, so a long
/// context keeps every SM busy (flash-decoding's split over the sequence).
const MIN_CHUNK: usize = 64;
/// Blocks the attention of one step aims for: a few per SM of a large GPU.
const TARGET_BLOCKS: usize = 512;

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("mesh kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// The contiguous part of `storage` that `layout` covers.
fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("mesh kernels take contiguous tensors");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

fn blocks_for(n: usize, threads: u32) -> u32 {
    n.div_ceil(threads as usize).clamp(1, 65_535) as u32
}

fn config(grid: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => candle_core::bail!("mesh kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

pub(super) fn rms_norm_residual(
    op: &RmsNormResidual,
    x: (&CudaStorage, &Layout),
    delta: (&CudaStorage, &Layout),
    weight: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &RmsNormResidual,
        x: (&CudaStorage, &Layout),
        delta: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = &x.0.device;
        let dim = *x.1.dims().last().unwrap_or(&0);
        let n = x.1.shape().elem_count();
        if dim == 0 || delta.1.shape() != x.1.shape() || weight.1.shape().elem_count() != dim {
            candle_core::bail!(
                "rms_norm_residual: shapes {:?} {:?} {:?}",
                x.1.dims(),
                delta.1.dims(),
                weight.1.dims()
            );
        }
        let rows = n / dim;
        let mut out: CudaSlice<T> = dev.alloc_zeros(2 * n)?;
        let (xv, dv, wv) = (
            view::<T>(x.0, x.1)?,
            view::<T>(delta.0, delta.1)?,
            view::<T>(weight.0, weight.1)?,
        );
        {
            let (mut sum, mut normed) = out.split_at_mut(n);
            let func = dev.get_or_load_custom_func(
                &format!("rms_norm_residual_{}", suffix(x.0.dtype())?),
                MODULE,
                PTX,
            )?;
            let threads = (dim.next_power_of_two().clamp(32, 1024)) as u32;
            let (dim_i, eps) = (dim as i32, op.eps);
            let mut b = func.builder();
            b.arg(&xv)
                .arg(&dv)
                .arg(&wv)
                .arg(&mut sum)
                .arg(&mut normed)
                .arg(&dim_i)
                .arg(&eps);
            unsafe { b.launch(config((rows as u32, 1), threads)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let storage = dispatch!(x.0.dtype(), run(op, x, delta, weight))?;
    let mut dims = vec![2];
    dims.extend_from_slice(x.1.dims());
    Ok((storage, Shape::from(dims)))
}

pub(super) fn rope_q(
    op: &RopeQ,
    qkv: (&CudaStorage, &Layout),
    rope: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &RopeQ,
        qkv: (&CudaStorage, &Layout),
        rope: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = &qkv.0.device;
        let q_len = op.heads * op.head_dim;
        if qkv.1.shape().elem_count() < q_len
            || rope.1.shape().elem_count() < (op.pos + 1) * op.head_dim
        {
            candle_core::bail!(
                "rope_q: qkv {:?} or rope {:?} too small",
                qkv.1.dims(),
                rope.1.dims()
            );
        }
        let mut out: CudaSlice<T> = dev.alloc_zeros(q_len)?;
        let (qv, rv) = (view::<T>(qkv.0, qkv.1)?, view::<f32>(rope.0, rope.1)?);
        let null = 0u64;
        let func = dev.get_or_load_custom_func(
            &format!("rope_kv_append_{}", suffix(qkv.0.dtype())?),
            MODULE,
            PTX,
        )?;
        let (heads, kv_heads, head_dim, max_len, pos) = (
            op.heads as i32,
            0i32,
            op.head_dim as i32,
            0i32,
            op.pos as i32,
        );
        let mut b = func.builder();
        b.arg(&qv)
            .arg(&null)
            .arg(&null)
            .arg(&rv)
            .arg(&mut out)
            .arg(&null);
        b.arg(&heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&max_len)
            .arg(&pos);
        let threads = (op.head_dim / 2).next_power_of_two().clamp(32, 1024) as u32;
        unsafe { b.launch(config((op.heads as u32, 1), threads)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let storage = dispatch!(qkv.0.dtype(), run(op, qkv, rope))?;
    Ok((storage, Shape::from((op.heads, op.head_dim))))
}

pub(super) fn kv_append(
    op: &KvAppend,
    cache: (&mut CudaStorage, &Layout),
    qkv: (&CudaStorage, &Layout),
    rope: (&CudaStorage, &Layout),
) -> Result<()> {
    fn run<T: CudaDType + DeviceRepr>(
        op: &KvAppend,
        cache: (&mut CudaStorage, &Layout),
        qkv: (&CudaStorage, &Layout),
        rope: (&CudaStorage, &Layout),
    ) -> Result<()> {
        let dev = cache.0.device.clone();
        let sfx = suffix(cache.0.dtype())?;
        let Some((start, end)) = cache.1.contiguous_offsets() else {
            candle_core::bail!("kv_append: the cache must be contiguous");
        };
        if end - start != 2 * op.kv_heads * op.max_len * op.head_dim
            || qkv.1.shape().elem_count() != op.qkv_len()
        {
            candle_core::bail!(
                "kv_append: cache {:?} or qkv {:?} of the wrong size",
                cache.1.dims(),
                qkv.1.dims()
            );
        }
        if rope.1.shape().elem_count() < (op.pos + 1) * op.head_dim {
            candle_core::bail!("rope table has no position {}", op.pos);
        }
        let qv = view::<T>(qkv.0, qkv.1)?;
        let q_len = op.heads * op.head_dim;
        let kv_len = op.kv_heads * op.head_dim;
        let (k, v) = (qv.slice(q_len..q_len + kv_len), qv.slice(q_len + kv_len..));
        let rv = view::<f32>(rope.0, rope.1)?;
        let mut cv = cache.0.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
        let null = 0u64;
        let func = dev.get_or_load_custom_func(&format!("rope_kv_append_{sfx}"), MODULE, PTX)?;
        // heads = 0: every block of this launch is a kv head.
        let (heads, kv_heads, head_dim, max_len, pos) = (
            0i32,
            op.kv_heads as i32,
            op.head_dim as i32,
            op.max_len as i32,
            op.pos as i32,
        );
        let mut b = func.builder();
        b.arg(&null)
            .arg(&k)
            .arg(&v)
            .arg(&rv)
            .arg(&null)
            .arg(&mut cv);
        b.arg(&heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&max_len)
            .arg(&pos);
        let threads = (op.head_dim / 2).next_power_of_two().clamp(32, 1024) as u32;
        unsafe { b.launch(config((op.kv_heads as u32, 1), threads)) }.w()?;
        Ok(())
    }
    dispatch!(cache.0.dtype(), run(op, cache, qkv, rope))
}

pub(super) fn gqa_decode(
    op: &GqaDecode,
    q: (&CudaStorage, &Layout),
    cache: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &GqaDecode,
        q: (&CudaStorage, &Layout),
        cache: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, usize)> {
        let dev = &q.0.device;
        let q_len = q.1.shape().elem_count();
        let heads = q_len / op.head_dim;
        if heads == 0
            || !heads.is_multiple_of(op.kv_heads)
            || cache.1.shape().elem_count() != 2 * op.kv_heads * op.max_len * op.head_dim
        {
            candle_core::bail!(
                "gqa_decode: q {:?} against cache {:?}",
                q.1.dims(),
                cache.1.dims()
            );
        }
        let group = heads / op.kv_heads;
        if !super::fused_decode_supported(heads, op.kv_heads, op.head_dim) {
            candle_core::bail!(
                "gqa_decode: no kernel for {group} heads per kv head of {}",
                op.head_dim
            );
        }
        let chunks = op
            .len
            .div_ceil(MIN_CHUNK)
            .min(TARGET_BLOCKS.div_ceil(op.kv_heads))
            .max(1);
        let chunk = op.len.div_ceil(chunks);
        let chunks = op.len.div_ceil(chunk);
        let mut partial: CudaSlice<f32> = dev.alloc_zeros(heads * chunks * (op.head_dim + 2))?;
        let mut out: CudaSlice<T> = dev.alloc_zeros(q_len)?;
        let (qv, cv) = (view::<T>(q.0, q.1)?, view::<T>(cache.0, cache.1)?);
        let sfx = suffix(q.0.dtype())?;
        let partial_fn = dev.get_or_load_custom_func(
            &format!("gqa_decode_partial_{sfx}_g{group}_d{}", op.head_dim),
            MODULE,
            PTX,
        )?;
        let (kv_heads, max_len, len, chunk_i, scale) = (
            op.kv_heads as i32,
            op.max_len as i32,
            op.len as i32,
            chunk as i32,
            op.scale,
        );
        let mut b = partial_fn.builder();
        b.arg(&qv)
            .arg(&cv)
            .arg(&mut partial)
            .arg(&kv_heads)
            .arg(&max_len)
            .arg(&len)
            .arg(&chunk_i)
            .arg(&scale);
        unsafe {
            b.launch(config(
                (op.kv_heads as u32, chunks as u32),
                ATTENTION_THREADS,
            ))
        }
        .w()?;
        let combine_fn =
            dev.get_or_load_custom_func(&format!("gqa_decode_combine_{sfx}"), MODULE, PTX)?;
        let (head_dim, chunks_i) = (op.head_dim as i32, chunks as i32);
        let mut b = combine_fn.builder();
        b.arg(&partial).arg(&mut out).arg(&head_dim).arg(&chunks_i);
        let threads = op.head_dim.next_power_of_two().clamp(32, 1024) as u32;
        unsafe { b.launch(config((heads as u32, 1), threads)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), heads))
    }
    let (storage, heads) = dispatch!(q.0.dtype(), run(op, q, cache))?;
    Ok((storage, Shape::from((heads, op.head_dim))))
}

pub(super) fn swiglu(
    op: &SwiGlu,
    gate_up: &CudaStorage,
    layout: &Layout,
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        op: &SwiGlu,
        gate_up: &CudaStorage,
        layout: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &gate_up.device;
        let n = layout.shape().elem_count() / 2;
        if op.width == 0 || !n.is_multiple_of(op.width) {
            candle_core::bail!("swiglu: {:?} is not rows of gate|up", layout.dims());
        }
        let rows = n / op.width;
        let mut out: CudaSlice<T> = dev.alloc_zeros(n)?;
        let gv = view::<T>(gate_up, layout)?;
        let func = dev.get_or_load_custom_func(
            &format!("swiglu_{}", suffix(gate_up.dtype())?),
            MODULE,
            PTX,
        )?;
        let (rows_u, width) = (rows, op.width as i32);
        let mut b = func.builder();
        b.arg(&gv).arg(&mut out).arg(&rows_u).arg(&width);
        unsafe { b.launch(config((blocks_for(n, 256), 1), 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let storage = dispatch!(gate_up.dtype(), run(op, gate_up, layout))?;
    Ok((storage, shape))
}
