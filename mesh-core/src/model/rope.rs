//! Rotary position embeddings: cos/sin tables for every position, with HF's scalings.

use candle_core::{DType, Device, Tensor};

use super::{LlamaConfig, ModelError, RopeScaling};

/// Per-position cos/sin tables of shape `[max_positions, head_dim / 2]`.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    /// On a GPU, for the fused decode kernels: `[max_positions, 2, head_dim / 2]` f32,
    /// the cosines then the sines of each position next to each other.
    packed: Option<Tensor>,
}

/// Inverse frequencies as HF's `_compute_default_rope_parameters` and
/// `_compute_llama3_parameters` define them.
pub(crate) fn inverse_frequencies(cfg: &LlamaConfig) -> Vec<f64> {
    let dim = cfg.head_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Default) | Some(RopeScaling::Linear { .. }) => base,
        Some(RopeScaling::Factors { factors }) => {
            base.iter().zip(factors).map(|(f, d)| f / d).collect()
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old_len = *original_max_position_embeddings as f64;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

impl RopeTables {
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let inv_freq = inverse_frequencies(cfg);
        let position_scale = match &cfg.rope_scaling {
            Some(RopeScaling::Linear { factor }) if *factor > 0.0 => 1.0 / factor,
            _ => 1.0,
        };
        let half = inv_freq.len();
        let positions = cfg.max_position_embeddings;
        // HF computes the tables in f32; so do we, so f32 models agree to the last bits.
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            let p = (p as f64 * position_scale) as f32;
            for &f in &inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), device)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?;
        let packed = if device.is_cuda() {
            Some(Tensor::stack(&[&cos, &sin], 1)?.contiguous()?)
        } else {
            None
        };
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            packed,
        })
    }

    /// The f32 `[positions, 2, head_dim / 2]` table of the fused kernels (GPU only).
    pub fn packed(&self) -> Option<&Tensor> {
        self.packed.as_ref()
    }

    /// Make the packed table on a device that does not have it by default (the CPU).
    pub fn ensure_packed(&mut self) -> Result<(), ModelError> {
        if self.packed.is_none() {
            self.packed = Some(self.packed_f32()?);
        }
        Ok(())
    }

    /// The packed table for any device, for tests of the kernels' CPU references.
    pub fn packed_f32(&self) -> Result<Tensor, ModelError> {
        let (cos, sin) = (
            self.cos.to_dtype(DType::F32)?,
            self.sin.to_dtype(DType::F32)?,
        );
        Ok(Tensor::stack(&[&cos, &sin], 1)?.contiguous()?)
    }

    /// Cosines and sines of position `pos`, in f32 (the CPU decode step).
    pub fn row_f32(&self, pos: usize) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let row = |t: &Tensor| -> Result<Vec<f32>, ModelError> {
            Ok(t.get(pos)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        Ok((row(&self.cos)?, row(&self.sin)?))
    }

    /// Rotate `x` of shape `[batch, heads, seq, head_dim]` for positions `start..start+seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor, ModelError> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}
