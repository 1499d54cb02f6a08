//! The portable definition of every fused decode kernel: plain loops over f32.
//!
//! These are what the CUDA kernels in `decode.cu` are tested against, and they are
//! themselves tested against the generic op sequence the model runs on the CPU, so a
//! kernel that agrees with its reference agrees with the model.

use candle_core::DType;

/// `x` rounded to what `dtype` can hold, as a kernel that stores and reloads it sees it.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// RMSNorm of each `dim`-wide row of `x + delta` (or of `x`), scaled by `weight`.
/// Returns the new residual stream (`x + delta`) and the normalised rows.
pub fn rms_norm_residual(
    x: &[f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    dtype: DType,
) -> (Vec<f32>, Vec<f32>) {
    let dim = weight.len();
    let sum: Vec<f32> = match delta {
        Some(d) => x
            .iter()
            .zip(d)
            .map(|(a, b)| round_to(dtype, a + b))
            .collect(),
        None => x.to_vec(),
    };
    let mut normed = Vec::with_capacity(sum.len());
    for row in sum.chunks(dim.max(1)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        normed.extend(
            row.iter()
                .zip(weight)
                .map(|(v, w)| round_to(dtype, v * inv * w)),
        );
    }
    (sum, normed)
}

/// Rotate each `head_dim`-wide head of one position's `x` (HF's rotate_half layout) by the
/// angles of position `pos`; `rope` is `[positions, 2, head_dim / 2]`: cosines, then sines.
pub fn rope_rotate(x: &[f32], rope: &[f32], pos: usize, head_dim: usize, dtype: DType) -> Vec<f32> {
    let half = head_dim / 2;
    let (c, s) = rope[pos * head_dim..(pos + 1) * head_dim].split_at(half);
    let mut out = vec![0.0; x.len()];
    for (head, dst) in x.chunks(head_dim).zip(out.chunks_mut(head_dim)) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            dst[i] = round_to(dtype, a * c[i] - b * s[i]);
            dst[i + half] = round_to(dtype, b * c[i] + a * s[i]);
        }
    }
    out
}

/// Write one position's rotated keys and plain values into a cache laid out as
/// `[2, kv_heads, max_len, head_dim]` (keys, then values) at `pos`.
#[allow(clippy::too_many_arguments)]
pub fn kv_append(
    cache: &mut [f32],
    k: &[f32],
    v: &[f32],
    rope: &[f32],
    pos: usize,
    max_len: usize,
    head_dim: usize,
    dtype: DType,
) {
    let kv_heads = k.len() / head_dim;
    let rotated = rope_rotate(k, rope, pos, head_dim, dtype);
    for h in 0..kv_heads {
        let key_at = (h * max_len + pos) * head_dim;
        let value_at = ((kv_heads + h) * max_len + pos) * head_dim;
        let head = h * head_dim..(h + 1) * head_dim;
        cache[key_at..key_at + head_dim].copy_from_slice(&rotated[head.clone()]);
        cache[value_at..value_at + head_dim].copy_from_slice(&v[head]);
    }
}

/// Attention of one position's query heads `q` (`[heads, head_dim]`) over the first `len`
/// positions of the cache; query head `h` reads kv head `h / (heads / kv_heads)`.
pub fn gqa_decode_attention(
    q: &[f32],
    cache: &[f32],
    kv_heads: usize,
    max_len: usize,
    len: usize,
    scale: f32,
    dtype: DType,
) -> Vec<f32> {
    let head_dim = cache.len() / (2 * kv_heads * max_len);
    let heads = q.len() / head_dim;
    let group = heads / kv_heads;
    let mut out = vec![0.0; q.len()];
    for h in 0..heads {
        let kh = h / group;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let key = |p: usize| &cache[(kh * max_len + p) * head_dim..][..head_dim];
        let value = |p: usize| &cache[((kv_heads + kh) * max_len + p) * head_dim..][..head_dim];
        let scores: Vec<f32> = (0..len)
            .map(|p| qh.iter().zip(key(p)).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let dst = &mut out[h * head_dim..(h + 1) * head_dim];
        for (p, w) in weights.iter().enumerate() {
            for (o, v) in dst.iter_mut().zip(value(p)) {
                *o += w * v;
            }
        }
        dst.iter_mut()
            .for_each(|o| *o = round_to(dtype, *o / total));
    }
    out
}

/// `silu(gate) * up` for rows of a fused projection: `width` gate values, then `width` up.
pub fn swiglu(gate_up: &[f32], width: usize, dtype: DType) -> Vec<f32> {
    gate_up
        .chunks(2 * width)
        .flat_map(|row| {
            let (gate, up) = row.split_at(width);
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| round_to(dtype, round_to(dtype, g / (1.0 + (-g).exp())) * u))
        })
        .collect()
}
