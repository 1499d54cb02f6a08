//! One Llama decoder block: RMSNorm, grouped-query attention with rotary embeddings,
//! SwiGLU MLP, residuals.
//!
//! On the CPU a one-token step multiplies through [`super::matvec`] (the products that
//! share an input as one job), the rest through candle's ops. On a GPU the q/k/v and gate/up
//! projections are fused into one matrix each (one launch instead of three or two, the
//! input read once), and a decode step of one token runs our own kernels
//! ([`super::kernels`]); prefill keeps the generic ops.

use candle_core::{DType, Tensor, D};

use super::cache::LayerKv;
use super::kernels;
use super::linear::Linear;
use super::matvec::{self, Dense};
use super::rope::RopeTables;
use super::{LlamaConfig, ModelError, Weights};

mod cpu_step;
pub(crate) use cpu_step::{Rotation, StepRow};

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    /// The scale in f32 for the CPU decode step, read once here instead of every token.
    weight_f32: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        let weight = w.get(name, &[size])?;
        Ok(Self {
            weight_f32: weight.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `x + delta` and its norm in one pass (the fused kernel).
    fn forward_residual(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        Ok(kernels::rms_norm_residual(
            x,
            delta,
            &self.weight,
            self.eps,
        )?)
    }
}

fn linear(
    w: &Weights,
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
) -> Result<Linear, ModelError> {
    w.linear(prefix, out_dim, in_dim, bias)
}

/// Several projections of one input: separate matrices (CPU, where the tests pin
/// agreement with transformers op for op), or one matrix stacked along the outputs (GPU).
/// Quantized matrices always stay separate.
#[derive(Clone, Debug)]
enum Projections {
    Separate(Vec<Linear>),
    Fused { linear: Dense, widths: Vec<usize> },
}

impl Projections {
    fn new(parts: Vec<Linear>, fuse: bool) -> Result<Self, ModelError> {
        let dense: Option<Vec<_>> = parts.iter().map(Linear::dense_parts).collect();
        let Some(dense) = dense.filter(|_| fuse) else {
            return Ok(Self::Separate(parts));
        };
        let widths = parts
            .iter()
            .map(Linear::out_dim)
            .collect::<Result<Vec<_>, _>>()?;
        let weights: Vec<&Tensor> = dense.iter().map(|(w, _)| *w).collect();
        let biases: Option<Vec<&Tensor>> = dense.iter().map(|(_, b)| *b).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self::Fused {
            linear: Dense::new(Tensor::cat(&weights, 0)?, bias),
            widths,
        })
    }

    /// Stack separate matrices into one (a no-op when they already are).
    fn fuse(&mut self) -> Result<(), ModelError> {
        if let Self::Separate(parts) = self {
            *self = Self::new(std::mem::take(parts), true)?;
        }
        Ok(())
    }

    /// Every projection's output, in the order they were given.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        match self {
            Self::Separate(parts) => {
                let dense: Option<Vec<&Dense>> = parts.iter().map(Linear::as_dense).collect();
                if let Some(dense) = dense {
                    if let Some(ys) = matvec::forward_many(&dense, x)? {
                        return Ok(ys);
                    }
                }
                parts.iter().map(|p| p.forward(x)).collect()
            }
            Self::Fused { linear, widths } => {
                let all = linear.forward(x)?;
                let mut at = 0;
                let mut out = Vec::with_capacity(widths.len());
                for &w in widths {
                    out.push(all.narrow(D::Minus1, at, w)?);
                    at += w;
                }
                Ok(out)
            }
        }
    }

    /// The stacked output, for the fused kernels; `None` when the matrices are separate.
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>, ModelError> {
        match self {
            Self::Separate(_) => Ok(None),
            Self::Fused { linear, .. } => Ok(Some(linear.forward(x)?)),
        }
    }
}

#[derive(Clone, Debug)]
struct Attention {
    qkv: Projections,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let bias = cfg.qkv_bias();
        let parts = vec![
            linear(w, &format!("{prefix}.q_proj"), nh * hd, h, bias)?,
            linear(w, &format!("{prefix}.k_proj"), nkv * hd, h, bias)?,
            linear(w, &format!("{prefix}.v_proj"), nkv * hd, h, bias)?,
        ];
        Ok(Self {
            qkv: Projections::new(parts, w.device().is_cuda())?,
            o_proj: linear(w, &format!("{prefix}.o_proj"), h, nh * hd, cfg.o_bias())?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x`: `[batch, seq, hidden]`, the tokens at positions `start..start+seq`.
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: &RopeTables,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Tensor, n: usize| -> Result<Tensor, ModelError> {
            Ok(proj
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| ModelError::Unsupported("attention needs q, k and v".into()))?;
        let q = rope.apply(&heads(&q, self.num_heads)?, start)?;
        let k = rope.apply(&heads(&k, self.num_kv_heads)?, start)?;
        let v = heads(&v, self.num_kv_heads)?;
        let (k, v) = cache.append(&k, &v, start)?;
        let k = repeat_kv(k, self.num_heads / self.num_kv_heads)?;
        let v = repeat_kv(v, self.num_heads / self.num_kv_heads)?;

        // Scores and softmax in f32 whatever the weights are, as HF's eager path does.
        let in_dtype = q.dtype();
        let q = q.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let v = v.to_dtype(DType::F32)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let total = start + t;
            scores = scores.broadcast_add(&causal_mask(t, total, start, x.device())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .to_dtype(in_dtype)?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// One token of one session (`x`: `[1, 1, hidden]`) through the fused kernels:
    /// rotary + cache append in place, then grouped-query attention over the cache.
    /// `None` when this attention has no fused projection (the CPU).
    fn forward_decode(
        &self,
        x: &Tensor,
        start: usize,
        rope: &RopeTables,
        cache: &mut LayerKv,
    ) -> Result<Option<Tensor>, ModelError> {
        let (Some(qkv), Some(table)) = (self.qkv.forward_fused(x)?, rope.packed()) else {
            return Ok(None);
        };
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let kv = cache.storage(1, nkv, hd, qkv.dtype(), qkv.device())?;
        let max_len = kv.dim(3)?;
        let kv = kv.reshape((2, nkv, max_len, hd))?;
        kernels::kv_append(&kv, &qkv, table, start, nh)?;
        let q = kernels::rope_q(&qkv, table, start, nh, hd)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let out = kernels::gqa_decode_attention(&q, &kv, start + 1, scale)?;
        Ok(Some(self.o_proj.forward(&out.reshape((
            1,
            1,
            nh * hd,
        ))?)?))
    }
}

/// `[t, total]` additive mask: query `i` (at position `start + i`) sees keys `0..=start+i`.
fn causal_mask(
    t: usize,
    total: usize,
    start: usize,
    device: &candle_core::Device,
) -> Result<Tensor, ModelError> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

/// Grouped-query attention: each KV head serves `n_rep` query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor, ModelError> {
    if n_rep == 1 {
        return Ok(x.contiguous()?);
    }
    let (b, nkv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, nkv, n_rep, s, d))?
        .contiguous()?
        .reshape((b, nkv * n_rep, s, d))?)
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_up: Projections,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let parts = vec![
            linear(w, &format!("{prefix}.gate_proj"), i, h, bias)?,
            linear(w, &format!("{prefix}.up_proj"), i, h, bias)?,
        ];
        Ok(Self {
            gate_up: Projections::new(parts, w.device().is_cuda())?,
            down_proj: linear(w, &format!("{prefix}.down_proj"), h, i, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(x)?
            .try_into()
            .map_err(|_| ModelError::Unsupported("the MLP needs gate and up".into()))?;
        let gate = candle_nn::ops::silu(&gate)?;
        self.down_proj.forward(&(gate * up)?)
    }

    /// The fused gate|up projection through the SwiGLU kernel; generic when not fused.
    fn forward_decode(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self.gate_up.forward_fused(x)? {
            Some(gate_up) => Ok(self.down_proj.forward(&kernels::swiglu(&gate_up)?)?),
            None => self.forward(x),
        }
    }
}

/// Transformer block `model.layers.{index}`.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Decode steps run the fused kernels (a GPU and a shape they are built for).
    fused_decode: bool,
    span: tracing::Span,
}

impl Block {
    pub fn load(w: &Weights, index: usize, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let p = format!("model.layers.{index}");
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
            fused_decode: w.device().is_cuda()
                && kernels::fused_decode_supported(
                    cfg.num_attention_heads,
                    cfg.num_kv_heads(),
                    cfg.head_dim(),
                ),
            span: tracing::trace_span!("block", index),
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: &RopeTables,
        cache: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let _enter = self.span.enter();
        if self.fused_decode && x.dims()[..2] == [1, 1] {
            let normed = self.input_layernorm.forward(x)?;
            if let Some(attn) = self.attn.forward_decode(&normed, start, rope, cache)? {
                let (x, normed) = self.post_attention_layernorm.forward_residual(x, &attn)?;
                return Ok((&x + self.mlp.forward_decode(&normed)?)?);
            }
        }
        let attn = self
            .attn
            .forward(&self.input_layernorm.forward(x)?, start, rope, cache)?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }
}

impl Block {
    /// Turn the fused decode path on or off. On a GPU it is on by default; turning it on
    /// elsewhere stacks the projections and runs the kernels' CPU references, which is how
    /// the tests check the path's wiring without a GPU. Shapes without kernels stay generic.
    pub fn set_fused_decode(&mut self, on: bool, cfg: &LlamaConfig) -> Result<(), ModelError> {
        let supported = kernels::fused_decode_supported(
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        if on && supported {
            self.attn.qkv.fuse()?;
            self.mlp.gate_up.fuse()?;
        }
        self.fused_decode = on && supported;
        Ok(())
    }
}
