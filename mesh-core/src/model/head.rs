//! The client's end of the model: token embeddings in, final norm and LM head out.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module};

use super::layers::RmsNorm;
use super::matvec::Dense;
use super::{LlamaConfig, ModelError, ModelFiles, Weights};

/// Embeddings, final RMSNorm and LM head: everything but the blocks.
///
/// Held by the client, so servers only ever see hidden states and every server of a
/// span is interchangeable (see docs/architecture.md).
#[derive(Clone, Debug)]
pub struct ClientHead {
    config: LlamaConfig,
    embed: Embedding,
    norm: RmsNorm,
    lm_head: Dense,
    device: Device,
    weight_bytes: usize,
}

impl ClientHead {
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        Self::from_weights(&files.config, &Weights::open(files, dtype, device)?)
    }

    /// The head of a model of shape `cfg`, taken from `w` (at its dtype, on its device).
    pub fn from_weights(cfg: &LlamaConfig, w: &Weights) -> Result<Self, ModelError> {
        let cfg = cfg.clone();
        let before = w.loaded_bytes();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_weight = w.get("model.embed_tokens.weight", &[v, h])?;
        let norm = RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?;
        // Tied models share the embedding matrix; HF drops lm_head.weight from the file.
        let lm_weight = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed_weight.clone()
        } else {
            w.get("lm_head.weight", &[v, h])?
        };
        Ok(Self {
            embed: Embedding::new(embed_weight, h),
            lm_head: Dense::new(lm_weight, None),
            norm,
            device: w.device().clone(),
            weight_bytes: w.loaded_bytes() - before,
            config: cfg,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Hidden states `[1, ids.len(), hidden]` for a sequence of token ids.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.embed.forward(&ids)?)
    }

    /// f32 logits `[batch, seq, vocab]` for hidden states leaving the last block.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        // Hidden states arrive in the last span's dtype; the head computes in its own.
        let dtype = self.embed.embeddings().dtype();
        let x = self
            .norm
            .forward(&hidden.to_device(&self.device)?.to_dtype(dtype)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// f32 logits of the last position of `hidden`, as a vector over the vocabulary.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>, ModelError> {
        let seq = hidden.dim(1)?;
        if seq == 0 {
            return Err(ModelError::HiddenShape {
                actual: hidden.dims().to_vec(),
                hidden_size: self.config.hidden_size,
            });
        }
        let last = hidden.narrow(1, seq - 1, 1)?;
        Ok(self.logits(&last)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
