//! A span of transformer blocks `[start, end)`: what one server loads and runs.

use candle_core::{DType, Device, Tensor};

use super::layers::{Block, Rotation, StepRow};
use super::matvec;
use super::rope::RopeTables;
use super::{LlamaConfig, ModelError, ModelFiles, Quantization, SpanCache, Weights};
use crate::types::BlockRange;

/// Blocks `[start, end)` of one model, holding only those blocks' weights.
#[derive(Clone, Debug)]
pub struct SpanModel {
    config: LlamaConfig,
    range: BlockRange,
    blocks: Vec<Block>,
    rope: RopeTables,
    dtype: DType,
    device: Device,
    weight_bytes: usize,
    /// How the projection matrices are stored (`None`: dense at `dtype`).
    quantization: Option<String>,
}

impl SpanModel {
    /// Load blocks `range` of the model in `files`, reading only their tensors.
    pub fn load(
        files: &ModelFiles,
        range: BlockRange,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_quantized(files, range, dtype, None, device)
    }

    /// Like [`SpanModel::load`], with the projection matrices quantized to `quantize` as
    /// they are read (a GGUF source keeps its own quantization whatever `quantize` says).
    pub fn load_quantized(
        files: &ModelFiles,
        range: BlockRange,
        dtype: DType,
        quantize: Option<Quantization>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let weights = Weights::open(files, dtype, device)?.with_quantization(quantize);
        Self::from_weights(&files.config, &weights, range)
    }

    /// Blocks `range` of a model of shape `config`, taken from `weights` (at its dtype, on
    /// its device).
    pub fn from_weights(
        config: &LlamaConfig,
        weights: &Weights,
        range: BlockRange,
    ) -> Result<Self, ModelError> {
        if !range.fits(config.num_blocks()) {
            return Err(ModelError::SpanOutOfRange {
                span: range,
                num_blocks: config.num_blocks(),
            });
        }
        let before = weights.loaded_bytes();
        let blocks = (range.start..range.end)
            .map(|i| Block::load(weights, i as usize, config))
            .collect::<Result<Vec<_>, _>>()?;
        let (dtype, device) = (weights.dtype(), weights.device().clone());
        let rope = RopeTables::new(config, dtype, &device)?;
        Ok(Self {
            weight_bytes: weights.loaded_bytes() - before,
            quantization: weights.format_label(),
            config: config.clone(),
            range,
            blocks,
            rope,
            dtype,
            device,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn range(&self) -> BlockRange {
        self.range
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a decode step's products run on the CPU's worker pool ([`matvec::pool`]),
    /// which a server then wakes as soon as a request arrives.
    pub fn decodes_on_pool(&self) -> bool {
        self.takes_cpu_step(&self.blocks) && shares_pool(&self.blocks, 1)
    }

    /// Whether decode steps run mesh's fused kernels (on by default on a GPU where the
    /// model's shape has them); off runs candle's generic ops, for comparisons. On the CPU
    /// the kernels are their references, so turning it on there tests the wiring.
    pub fn set_fused_decode(&mut self, on: bool) -> Result<(), ModelError> {
        if on {
            self.rope.ensure_packed()?;
        }
        for block in &mut self.blocks {
            block.set_fused_decode(on, &self.config)?;
        }
        Ok(())
    }

    /// How the span's projection matrices are stored, as servers announce it: `None` for
    /// dense weights at [`SpanModel::dtype`], else `q8_0`, `q4k` or `gguf:<types>`.
    pub fn quantization(&self) -> Option<&str> {
        self.quantization.as_deref()
    }

    /// Bytes of weights this span copied out of the model files.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A fresh cache for one session of at most `max_len` tokens over the whole span.
    pub fn new_cache(&self, max_len: usize) -> Result<SpanCache, ModelError> {
        self.new_sub_cache(self.range, max_len)
    }

    /// A fresh cache for a session that runs only blocks `range` of this span, so a
    /// client can route through part of what a server holds.
    pub fn new_sub_cache(
        &self,
        range: BlockRange,
        max_len: usize,
    ) -> Result<SpanCache, ModelError> {
        if range.is_empty() || range.start < self.range.start || range.end > self.range.end {
            return Err(ModelError::SpanOutOfRange {
                span: range,
                num_blocks: self.config.num_blocks(),
            });
        }
        let limit = self.config.max_position_embeddings;
        if max_len == 0 || max_len > limit {
            return Err(ModelError::ContextOverflow {
                requested: max_len,
                max: limit,
            });
        }
        Ok(SpanCache::new(range, max_len))
    }

    /// Whether a one-token step runs [`Block::cpu_step`]: on the CPU, with the
    /// matrix-vector path on, and not while the fused kernels' references are under test.
    fn takes_cpu_step(&self, blocks: &[Block]) -> bool {
        self.device.is_cpu() && matvec::enabled() && blocks.iter().all(Block::takes_cpu_step)
    }

    /// Run hidden states `[batch, seq, hidden]` for positions `start_pos..start_pos+seq`
    /// through the blocks of the cache's range, extending the session's cache.
    ///
    /// A prefill is one call with many tokens; decoding is one call per token.
    pub fn forward(
        &self,
        cache: &mut SpanCache,
        hidden: &Tensor,
        start_pos: usize,
    ) -> Result<Tensor, ModelError> {
        let dims = hidden.dims();
        if dims.len() != 3 || dims[2] != self.config.hidden_size || dims[1] == 0 || dims[0] == 0 {
            return Err(ModelError::HiddenShape {
                actual: dims.to_vec(),
                hidden_size: self.config.hidden_size,
            });
        }
        if start_pos != cache.len() {
            return Err(ModelError::PositionMismatch {
                expected: cache.len(),
                got: start_pos,
            });
        }
        let seq = dims[1];
        if start_pos + seq > cache.max_len() {
            return Err(ModelError::ContextOverflow {
                requested: start_pos + seq,
                max: cache.max_len(),
            });
        }
        let blocks = self.blocks_of(cache)?;
        if seq == 1 && dims[0] == 1 && self.takes_cpu_step(blocks) {
            let _step = hold_pool(blocks, 1);
            let mut x = hidden
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let rotation = Rotation::at(&self.rope, start_pos)?;
            for (block, kv) in blocks.iter().zip(cache.layers.iter_mut()) {
                let row = StepRow {
                    x: &mut x,
                    pos: start_pos,
                    rotation: &rotation,
                    kv,
                };
                block.cpu_steps(&mut [row], self.dtype)?;
            }
            cache.advance(1);
            return Ok(Tensor::from_vec(x, dims, &self.device)?.to_dtype(self.dtype)?);
        }
        let mut x = hidden.to_device(&self.device)?.to_dtype(self.dtype)?;
        for (block, kv) in blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, start_pos, &self.rope, kv)?;
        }
        cache.advance(seq);
        Ok(x)
    }

    /// One decode step (one position, `[1, 1, hidden]`) of each of several sessions, as
    /// one pass over the weights when the CPU step applies and the sessions run the same
    /// blocks; each output is exactly what [`SpanModel::forward`] gives that session
    /// alone, and each session's cache advances the same way. Otherwise, or for a step
    /// that does not fit, the steps run one by one; a step's error is its own.
    pub fn forward_decode_batch(
        &self,
        steps: &mut [(&mut SpanCache, &Tensor)],
    ) -> Vec<Result<Tensor, ModelError>> {
        let batchable = steps.len() > 1
            && steps.iter().all(|(cache, hidden)| {
                cache.range == steps[0].0.range
                    && hidden.dims() == [1, 1, self.config.hidden_size]
                    && cache.len() < cache.max_len()
            });
        let blocks = steps
            .first()
            .and_then(|(cache, _)| self.blocks_of(cache).ok());
        if let Some(blocks) = blocks.filter(|b| batchable && self.takes_cpu_step(b)) {
            // A failed batch advanced no cache: the steps then run alone, each with its
            // own outcome.
            match self.cpu_steps_batch(blocks, steps) {
                Ok(outs) => return outs.into_iter().map(Ok).collect(),
                Err(e) => tracing::debug!("batched decode failed ({e}); one step at a time"),
            }
        }
        steps
            .iter_mut()
            .map(|(cache, hidden)| {
                let pos = cache.len();
                self.forward(cache, hidden, pos)
            })
            .collect()
    }

    /// The blocks a cache of this span runs.
    fn blocks_of(&self, cache: &SpanCache) -> Result<&[Block], ModelError> {
        let first = cache.range.start.wrapping_sub(self.range.start) as usize;
        self.blocks
            .get(first..first + cache.layers.len())
            .filter(|_| cache.range.start >= self.range.start)
            .ok_or(ModelError::SpanOutOfRange {
                span: cache.range,
                num_blocks: self.config.num_blocks(),
            })
    }

    fn cpu_steps_batch(
        &self,
        blocks: &[Block],
        steps: &mut [(&mut SpanCache, &Tensor)],
    ) -> Result<Vec<Tensor>, ModelError> {
        let _step = hold_pool(blocks, steps.len());
        let mut xs = Vec::with_capacity(steps.len());
        let mut rotations = Vec::with_capacity(steps.len());
        for (cache, hidden) in steps.iter() {
            xs.push(
                hidden
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            rotations.push(Rotation::at(&self.rope, cache.len())?);
        }
        for (b, block) in blocks.iter().enumerate() {
            let mut rows: Vec<StepRow<'_>> = Vec::with_capacity(steps.len());
            for ((x, rotation), (cache, _)) in xs.iter_mut().zip(&rotations).zip(steps.iter_mut()) {
                let pos = cache.len();
                let kv = cache
                    .layers
                    .get_mut(b)
                    .ok_or_else(|| ModelError::Unsupported("a cache without this block".into()))?;
                rows.push(StepRow {
                    x,
                    pos,
                    rotation,
                    kv,
                });
            }
            block.cpu_steps(&mut rows, self.dtype)?;
        }
        let mut outs = Vec::with_capacity(steps.len());
        for (x, (cache, hidden)) in xs.into_iter().zip(steps.iter_mut()) {
            cache.advance(1);
            outs.push(Tensor::from_vec(x, hidden.dims(), &self.device)?.to_dtype(self.dtype)?);
        }
        Ok(outs)
    }
}

/// Whether a step of `rows` sessions through `blocks` runs its products on the pool's
/// workers: all of them on the pool, and some worth a hand-off ([`matvec::worth_sharing`]).
fn shares_pool(blocks: &[Block], rows: usize) -> bool {
    !blocks.is_empty()
        && blocks.iter().all(Block::products_on_pool)
        && blocks
            .iter()
            .any(|b| matvec::worth_sharing(b.largest_product() * rows))
}

/// Hold the pool for a step of `rows` sessions through `blocks` when it runs on the
/// workers ([`shares_pool`]); a step too small for them leaves them parked.
fn hold_pool(blocks: &[Block], rows: usize) -> Option<matvec::Hold<'static>> {
    shares_pool(blocks, rows).then(|| matvec::pool().hold())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny;

    fn span_of(dir: &std::path::Path, hidden: usize, intermediate: usize) -> SpanModel {
        let cfg = LlamaConfig::from_json(
            &serde_json::json!({
                "vocab_size": 259, "hidden_size": hidden, "intermediate_size": intermediate,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 1,
                "eos_token_id": 2
            })
            .to_string(),
        )
        .expect("config");
        tiny::write_random(dir, &cfg).expect("model");
        let files = ModelFiles::open(dir).expect("files");
        SpanModel::load(&files, BlockRange::new(0, 2), DType::F32, &Device::Cpu).expect("span")
    }

    /// A span whose products are all too small for a hand-off ([`matvec::MIN_SHARED_WORK`])
    /// leaves the workers parked, and a server does not wake them for its requests; one
    /// with a product worth splitting holds them, and a batch of small steps may too.
    #[test]
    fn only_steps_worth_splitting_hold_the_workers() {
        let (small, large) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        // Largest job: gate and up, 2 · 344 · 128 = 88K elements.
        let small = span_of(small.path(), 128, 344);
        // 2 · 768 · 256 = 393K elements.
        let large = span_of(large.path(), 256, 768);
        assert!(!small.decodes_on_pool());
        assert!(!shares_pool(&small.blocks, 1));
        assert!(shares_pool(&small.blocks, 2));
        assert!(large.decodes_on_pool());
        assert!(shares_pool(&large.blocks, 1));
        assert!(!shares_pool(&[], 16));
    }
}
