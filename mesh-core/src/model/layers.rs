//! One Llama decoder block: RMSNorm, grouped-query attention with rotary embeddings,
//! SwiGLU MLP, residuals.

use candle_core::{DType, Tensor};
use candle_nn::{kv_cache::KvCache, Linear, Module};

use super::rope::RopeTables;
use super::{LlamaConfig, ModelError, Weights};

/// RMSNorm with a learned scale.
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.get(name, &[size])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

fn linear(
    w: &Weights,
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
) -> Result<Linear, ModelError> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias {
        Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
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
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(w, &format!("{prefix}.q_proj"), nh * hd, h, bias)?,
            k_proj: linear(w, &format!("{prefix}.k_proj"), nkv * hd, h, bias)?,
            v_proj: linear(w, &format!("{prefix}.v_proj"), nkv * hd, h, bias)?,
            o_proj: linear(w, &format!("{prefix}.o_proj"), h, nh * hd, bias)?,
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
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Linear, n: usize| -> Result<Tensor, ModelError> {
            Ok(proj
                .forward(x)?
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope.apply(&heads(&self.q_proj, self.num_heads)?, start)?;
        let k = rope.apply(&heads(&self.k_proj, self.num_kv_heads)?, start)?;
        let v = heads(&self.v_proj, self.num_kv_heads)?;
        let (k, v) = cache.append(&k, &v)?;
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
        Ok(self.o_proj.forward(&out)?)
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
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, cfg: &LlamaConfig) -> Result<Self, ModelError> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(w, &format!("{prefix}.gate_proj"), i, h, bias)?,
            up_proj: linear(w, &format!("{prefix}.up_proj"), i, h, bias)?,
            down_proj: linear(w, &format!("{prefix}.down_proj"), h, i, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

/// Transformer block `model.layers.{index}`.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
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
            span: tracing::trace_span!("block", index),
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: &RopeTables,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let _enter = self.span.enter();
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
