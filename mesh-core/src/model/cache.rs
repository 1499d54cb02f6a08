//! The KV cache one session keeps on one span.

use candle_core::DType;
use candle_nn::kv_cache::KvCache;

use super::LlamaConfig;
use crate::types::BlockRange;

/// Keys and values of every block of a span for one session, preallocated to `max_len`
/// tokens on first use so a server's memory budget is a reservation, not a hope.
#[derive(Debug, Clone)]
pub struct SpanCache {
    pub(crate) range: BlockRange,
    pub(crate) layers: Vec<KvCache>,
    len: usize,
    max_len: usize,
}

impl SpanCache {
    pub(crate) fn new(range: BlockRange, max_len: usize) -> Self {
        Self {
            range,
            layers: (0..range.len()).map(|_| KvCache::new(2, max_len)).collect(),
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

    /// Forget every token; the next step starts again at position 0.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
        self.len = 0;
    }

    /// Bytes a cache of `max_len` tokens over `num_layers` blocks takes at `dtype`.
    pub fn bytes_for(cfg: &LlamaConfig, num_layers: usize, max_len: usize, dtype: DType) -> usize {
        2 * num_layers * cfg.num_kv_heads() * cfg.head_dim() * max_len * dtype.size_in_bytes()
    }
}
