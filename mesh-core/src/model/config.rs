//! `config.json` of a Hugging Face Llama-family model, checked on load.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Rotary-embedding frequency scaling, as HF writes it under `rope_scaling`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// No scaling (some configs spell it out).
    Default,
    /// Positions divided by `factor` (Code Llama style).
    Linear { factor: f64 },
    /// Llama 3.x: long wavelengths stretched, short ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Each rotary frequency divided by its own factor: how llama.cpp stores Llama 3's
    /// scaling in a GGUF (the `rope_freqs` tensor), already evaluated. Not an HF layout.
    Factors { factors: Vec<f64> },
}

/// The subset of a Llama/Mistral/TinyLlama `config.json` that the forward pass depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, deserialize_with = "rope_scaling_or_null")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<EosTokens>,
    /// transformers >= 5 writes `rope_theta` and the scaling together under this key;
    /// [`LlamaConfig::from_json`] folds it into `rope_theta` / `rope_scaling`.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    /// HF's class names (`LlamaForCausalLM`, ...); checked with `model_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Mistral and Qwen2 may attend only to the last `sliding_window` tokens; mesh attends
    /// to all, which is the same computation while the context is at most the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2 turns its window on with this flag (off in every released Qwen2/2.5 config).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_sliding_window: bool,
}

/// The architectures mesh runs: `(model_type, HF class)`. All are the Llama block with
/// per-architecture details (Qwen2: q/k/v biases; Mistral: an optional sliding window).
pub const SUPPORTED_ARCHITECTURES: [(&str, &str); 3] = [
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
];

/// HF allows `eos_token_id` to be one id or a list (Llama 3 has several).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    One(u32),
    Many(Vec<u32>),
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_max_position() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".into()
}

#[derive(Deserialize)]
struct RopeScalingField {
    #[serde(default, deserialize_with = "rope_scaling_or_null")]
    rope_scaling: Option<RopeScaling>,
}

/// Older configs write `"rope_scaling": {"type": "linear", ...}`; newer ones `rope_type`.
fn rope_scaling_or_null<'de, D>(d: D) -> Result<Option<RopeScaling>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value: Option<serde_json::Value> = Option::deserialize(d)?;
    let Some(mut value) = value else {
        return Ok(None);
    };
    if let Some(obj) = value.as_object_mut() {
        if !obj.contains_key("rope_type") {
            if let Some(t) = obj.remove("type") {
                obj.insert("rope_type".into(), t);
            }
        }
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl LlamaConfig {
    /// Read and validate `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::MalformedConfig { reason, .. } => {
                ModelError::MalformedConfig { path, reason }
            }
            other => other,
        })
    }

    /// Parse and validate the text of a `config.json`, in the layout of transformers 4
    /// (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`).
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let malformed = |reason: String| ModelError::MalformedConfig {
            path: "config.json".into(),
            reason,
        };
        let mut cfg: LlamaConfig =
            serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        if let Some(params) = cfg.rope_parameters.take() {
            if let Some(theta) = params.get("rope_theta").and_then(|t| t.as_f64()) {
                cfg.rope_theta = theta;
            }
            let scaling = serde_json::json!({ "rope_scaling": params });
            let parsed: RopeScalingField = serde_json::from_value(scaling)
                .map_err(|e| malformed(format!("rope_parameters: {e}")))?;
            cfg.rope_scaling = parsed.rope_scaling;
        }
        cfg.apply_sliding_window();
        cfg.validate()?;
        Ok(cfg)
    }

    /// A window at least the context is full attention; a shorter one (Mistral v0.1)
    /// caps the context at the window, where full attention computes the same thing.
    fn apply_sliding_window(&mut self) {
        let active = match self.model_type.as_str() {
            "qwen2" => self.use_sliding_window,
            _ => true,
        };
        if let (true, Some(window)) = (active, self.sliding_window) {
            if window > 0 && window < self.max_position_embeddings {
                self.max_position_embeddings = window;
            }
        }
    }

    /// Whether q/k/v carry biases: Qwen2 always, others when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Whether `o_proj` carries a bias (never in Qwen2, whose only biases are q/k/v).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2"
    }

    /// Reject configs that would make the forward pass panic or silently compute nonsense.
    pub fn validate(&self) -> Result<(), ModelError> {
        let unsupported = |msg: String| Err(ModelError::Unsupported(msg));
        let names = || {
            SUPPORTED_ARCHITECTURES
                .iter()
                .map(|(t, c)| format!("{t} ({c})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((_, class)) = SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(t, _)| *t == self.model_type)
        else {
            return unsupported(format!(
                "model_type {:?}; supported: {}",
                self.model_type,
                names()
            ));
        };
        if let Some(other) = self
            .architectures
            .iter()
            .flatten()
            .find(|a| a.as_str() != *class)
        {
            return unsupported(format!(
                "architecture {other:?} with model_type {:?}; supported: {}",
                self.model_type,
                names()
            ));
        }
        if self.hidden_act != "silu" {
            return unsupported(format!("hidden_act {:?} (only silu)", self.hidden_act));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return unsupported(format!("{name} is 0"));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return unsupported(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return unsupported(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return unsupported(format!("head_dim {hd} must be even and non-zero"));
        }
        if let Some(RopeScaling::Factors { factors }) = &self.rope_scaling {
            if factors.len() != hd / 2 || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return unsupported(format!(
                    "rope factors: {} positive factors for head_dim {hd} (expected {})",
                    factors.len(),
                    hd / 2
                ));
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return unsupported("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_blocks(&self) -> u32 {
        u32::try_from(self.num_hidden_layers).unwrap_or(u32::MAX)
    }

    /// Token ids that end generation by default.
    pub fn eos_tokens(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(EosTokens::One(id)) => vec![*id],
            Some(EosTokens::Many(ids)) => ids.clone(),
            None => Vec::new(),
        }
    }

    /// Parameter count of one transformer block, for sizing spans against memory.
    pub fn block_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_kv_heads() * self.head_dim();
        let attn = h * q + 2 * h * kv + q * h + usize::from(self.qkv_bias()) * (q + 2 * kv);
        let mlp = 3 * h * self.intermediate_size;
        attn + mlp + 2 * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2
        })
    }

    #[test]
    fn parses_minimal_config_with_defaults() {
        let cfg: LlamaConfig = serde_json::from_value(base()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.head_dim(), 4);
        assert_eq!(cfg.num_kv_heads(), 2);
        assert_eq!(cfg.rope_scaling, None);
    }

    #[test]
    fn parses_llama3_and_legacy_rope_scaling() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let cfg: LlamaConfig = serde_json::from_value(v.clone()).unwrap();
        assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let cfg: LlamaConfig = serde_json::from_value(v).unwrap();
        assert_eq!(cfg.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn parses_transformers5_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64});
        let cfg = LlamaConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        assert!(
            matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e4});
        let cfg = LlamaConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.rope_scaling, Some(RopeScaling::Default));
        v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        assert!(matches!(
            LlamaConfig::from_json(&v.to_string()),
            Err(ModelError::MalformedConfig { .. })
        ));
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let mut v = base();
        v["num_key_value_heads"] = serde_json::json!(3);
        let cfg: LlamaConfig = serde_json::from_value(v).unwrap();
        assert!(matches!(cfg.validate(), Err(ModelError::Unsupported(_))));
    }

    #[test]
    fn qwen2_and_mistral_are_known_and_others_refused_by_name() {
        let mut v = base();
        v["model_type"] = serde_json::json!("qwen2");
        v["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        let cfg = LlamaConfig::from_json(&v.to_string()).unwrap();
        assert!(cfg.qkv_bias() && !cfg.o_bias());
        v["model_type"] = serde_json::json!("mistral");
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        v["sliding_window"] = serde_json::json!(null);
        assert!(LlamaConfig::from_json(&v.to_string()).is_ok());
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let err = LlamaConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
        v["model_type"] = serde_json::json!("gemma2");
        v["architectures"] = serde_json::json!(["Gemma2ForCausalLM"]);
        let err = LlamaConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("gemma2") && err.contains("qwen2"), "{err}");
    }

    #[test]
    fn rope_factors_need_one_positive_factor_per_frequency() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "factors", "factors": [1.0, 8.0]});
        assert!(LlamaConfig::from_json(&v.to_string()).is_ok());
        v["rope_scaling"] = serde_json::json!({"rope_type": "factors", "factors": [1.0]});
        assert!(LlamaConfig::from_json(&v.to_string()).is_err());
        v["rope_scaling"] = serde_json::json!({"rope_type": "factors", "factors": [1.0, 0.0]});
        assert!(LlamaConfig::from_json(&v.to_string()).is_err());
    }

    #[test]
    fn a_short_sliding_window_caps_the_context() {
        let mut v = base();
        v["model_type"] = serde_json::json!("mistral");
        v["max_position_embeddings"] = serde_json::json!(4096);
        v["sliding_window"] = serde_json::json!(1024);
        let cfg = LlamaConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.max_position_embeddings, 1024);
        // Qwen2 writes a window but leaves it off.
        v["model_type"] = serde_json::json!("qwen2");
        let cfg = LlamaConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.max_position_embeddings, 4096);
    }

    #[test]
    fn eos_may_be_a_list() {
        let mut v = base();
        v["eos_token_id"] = serde_json::json!([2, 7]);
        let cfg: LlamaConfig = serde_json::from_value(v).unwrap();
        assert_eq!(cfg.eos_tokens(), vec![2, 7]);
    }
}
