//! Weight quantization: which formats a span's projection matrices may be stored in.
//!
//! Quantized weights let a provider hold 2-4x more blocks in the same memory. Only the
//! block projections are quantized; norms, the KV cache and activations stay in the
//! compute dtype, as llama.cpp does, because they are small and error there compounds.

use candle_core::quantized::GgmlDType;

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
    /// and rows not even that stay dense (`None`), as llama.cpp's quantizer does.
    pub fn ggml_for(self, in_dim: usize) -> Option<GgmlDType> {
        let wanted = match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        };
        [wanted, GgmlDType::Q8_0]
            .into_iter()
            .find(|d| in_dim.is_multiple_of(d.block_size()))
    }

    /// Bytes per weight of a row of `in_dim` (for sizing spans before loading them).
    pub fn bytes_per_weight(self, in_dim: usize) -> f64 {
        match self.ggml_for(in_dim) {
            Some(d) => d.type_size() as f64 / d.block_size() as f64,
            None => 4.0,
        }
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
        assert!((Quantization::Q4K.bytes_per_weight(4096) - 0.5625).abs() < 1e-9);
        assert!((Quantization::Q8_0.bytes_per_weight(4096) - 1.0625).abs() < 1e-9);
    }
}
