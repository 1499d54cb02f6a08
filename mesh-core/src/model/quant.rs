//! Weight quantization: which formats a span's projection matrices may be stored in.
//!
//! Quantized weights let a provider hold 2-4x more blocks in the same memory. Only the
//! block projections are quantized; norms, the KV cache and activations stay in the
//! compute dtype, as llama.cpp does, because they are small and error there compounds.

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use super::LlamaConfig;

/// How a span's weights are stored, as announced to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Quantization {
    /// 8-bit blocks of 32 with one f16 scale (llama.cpp Q8_0): 8.5 bits a weight.
    Q8_0,
    /// 4-bit super-blocks of 256 with 6-bit sub-scales (llama.cpp Q4_K): 4.5 bits a weight.
    Q4K,
}

impl Quantization {
    /// Parse a name as written on the command line and in node.toml.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Some(Self::Q8_0),
            "q4k" | "q4_k" | "q4_k_m" => Some(Self::Q4K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        }
    }

    /// The ggml format a matrix with rows of `in_dim` is stored in. A K-quant needs rows
    /// that are whole super-blocks of 256; narrower ones fall back to Q8_0 (blocks of 32),
    /// and rows not even that stay dense (`None`). (llama.cpp falls Q4_K back to Q5_0,
    /// but candle's Q5_0 product needs rows of an even number of blocks.)
    pub fn ggml_for(self, in_dim: usize) -> Option<GgmlDType> {
        let wanted = match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        };
        [wanted, GgmlDType::Q8_0]
            .into_iter()
            .find(|d| in_dim.is_multiple_of(d.block_size()))
    }

    /// Bytes of one block of `cfg` with its projections quantized to `self` and the rest
    /// (norms, biases, matrices too narrow to quantize) at `dtype`: what
    /// [`super::SpanModel::weight_bytes`] measures, known before loading.
    pub fn block_bytes(self, cfg: &LlamaConfig, dtype: DType) -> u64 {
        let dense = dtype.size_in_bytes();
        let matrix = |rows: usize, cols: usize| -> usize {
            match self.ggml_for(cols) {
                Some(d) => rows * cols / d.block_size() * d.type_size(),
                None => rows * cols * dense,
            }
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let matrices =
            matrix(q, h) + 2 * matrix(kv, h) + matrix(h, q) + 2 * matrix(i, h) + matrix(h, i);
        let biases = usize::from(cfg.qkv_bias()) * (q + 2 * kv) + usize::from(cfg.o_bias()) * h;
        (matrices + (biases + 2 * h) * dense) as u64
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?}: expected q8_0 or q4k"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_narrow_rows_fall_back() {
        for q in [Quantization::Q8_0, Quantization::Q4K] {
            assert_eq!(Quantization::parse(q.name()), Some(q));
        }
        assert_eq!(Quantization::parse("q3"), None);
        assert_eq!(Quantization::Q4K.ggml_for(512), Some(GgmlDType::Q4K));
        assert_eq!(Quantization::Q4K.ggml_for(160), Some(GgmlDType::Q8_0));
        assert_eq!(Quantization::Q8_0.ggml_for(20), None);
    }
}
