//! The KV cache one session keeps on one span.

use candle_core::{DType, Tensor};

use super::LlamaConfig;
use crate::types::BlockRange;

/// Keys and values of every block of a span for one session, preallocated to `max_len`
/// tokens on first use so a server's memory budget is a reservation, not a hope.
#[derive(Debug, Clone)]
pub struct SpanCache {
    pub(crate) range: BlockRange,
    pub(crate) layers: Vec<LayerKv>,
    len: usize,
    max_len: usize,
}

impl SpanCache {
    pub(crate) fn new(range: BlockRange, max_len: usize) -> Self {
        Self {
            range,
            layers: (0..range.len()).map(|_| LayerKv::new(max_len)).collect(),
            len: 0,
            max_len,
        }
    }

    /// The blocks this cache belongs to.
    pub fn range(&self) -> BlockRange {
        self.range
    }

    /// Tokens held so far: the position the next hidden state must start at.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Forget the tokens from position `len` on (a draft's rejected tokens); the next step
    /// starts at `len`. Past the end it changes nothing.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Undo a [`SpanCache::truncate`] whose step was refused before it wrote anything.
    pub(crate) fn restore_len(&mut self, len: usize) {
        self.len = len.min(self.max_len);
    }

    /// Forget every token; the next step starts again at position 0. The storage stays:
    /// every step writes its positions before anything reads them.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Bytes a cache of `max_len` tokens over `num_layers` blocks takes at `dtype`.
    pub fn bytes_for(cfg: &LlamaConfig, num_layers: usize, max_len: usize, dtype: DType) -> usize {
        2 * num_layers * cfg.num_kv_heads() * cfg.head_dim() * max_len * dtype.size_in_bytes()
    }
}

/// One block's keys and values: a single `[2, batch, kv_heads, max_len, head_dim]` tensor
/// (keys, then values), allocated on the first step. Steps write their positions in place,
/// so the generic ops and the fused CUDA decode kernels share one layout.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    kv: Option<Tensor>,
    max_len: usize,
}

impl LayerKv {
    fn new(max_len: usize) -> Self {
        Self { kv: None, max_len }
    }

    /// The whole cache for `batch × kv_heads` heads of `head_dim`, allocated on first use
    /// (and again only if the shape, dtype or device changes).
    pub fn storage(
        &mut self,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<&Tensor> {
        let dims = [2, batch, kv_heads, self.max_len, head_dim];
        let fits = self.kv.as_ref().is_some_and(|kv| {
            kv.dims() == dims && kv.dtype() == dtype && kv.device().same_device(device)
        });
        if !fits {
            self.kv = Some(Tensor::zeros(&dims, dtype, device)?);
        }
        self.kv
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("cache was just allocated".into()))
    }

    /// Write `k` and `v` (`[batch, kv_heads, t, head_dim]`) at positions `pos..pos + t` and
    /// return every key and value up to them.
    pub fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, heads, t, head_dim) = k.dims4()?;
        let kv = self.storage(b, heads, head_dim, k.dtype(), k.device())?;
        let (keys, values) = (kv.get(0)?, kv.get(1)?);
        keys.slice_set(&k.contiguous()?, 2, pos)?;
        values.slice_set(&v.contiguous()?, 2, pos)?;
        Ok((keys.narrow(2, 0, pos + t)?, values.narrow(2, 0, pos + t)?))
    }
}
