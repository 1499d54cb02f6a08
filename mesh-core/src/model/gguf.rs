//! llama.cpp GGUF files as a model source: the config from the metadata, tensors under
//! their Hugging Face names, each read only when a span asks for it.
//!
//! Names follow llama.cpp's converter (`blk.N.attn_q.weight` is
//! `model.layers.N.self_attn.q_proj.weight`). For the `llama` architecture the converter
//! permutes the rows of q and k, because llama.cpp's rope rotates adjacent pairs where
//! transformers rotates halves; reading them back undoes that permutation, so a GGUF block
//! computes exactly what the safetensors block does. Quantized rows are permuted as whole
//! rows of blocks, without dequantizing.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use super::{LlamaConfig, ModelError};

/// An open GGUF file: its metadata, and the file to read tensors from on demand.
pub(crate) struct GgufFile {
    path: PathBuf,
    content: Content,
    file: RefCell<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl GgufFile {
    /// Read the header (metadata and tensor table; no tensor data).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Gguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: RefCell::new(file),
        })
    }

    fn bad(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)?.to_string().ok().map(String::as_str)
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        self.meta(key)?.to_bool().ok()
    }

    /// An unsigned integer of any width.
    pub fn meta_u64_lossy(&self, key: &str) -> Option<u64> {
        self.meta(key)?.to_u64().ok()
    }

    /// An array of strings; `None` when absent or of another type.
    pub fn meta_strings(&self, key: &str) -> Option<Vec<String>> {
        self.meta(key)?
            .to_vec()
            .ok()?
            .iter()
            .map(|v| v.to_string().ok().cloned())
            .collect()
    }

    /// An array of floats; `None` when absent or of another type.
    pub fn meta_floats(&self, key: &str) -> Option<Vec<f32>> {
        self.meta(key)?
            .to_vec()
            .ok()?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Some(*x),
                Value::F64(x) => Some(*x as f32),
                _ => None,
            })
            .collect()
    }

    /// An array of integers of any width; `None` when absent or of another type.
    pub fn meta_ints(&self, key: &str) -> Option<Vec<i64>> {
        self.meta(key)?
            .to_vec()
            .ok()?
            .iter()
            .map(|v| match v {
                Value::I32(x) => Some(i64::from(*x)),
                Value::I64(x) => Some(*x),
                Value::U32(x) => Some(i64::from(*x)),
                Value::I8(x) => Some(i64::from(*x)),
                Value::U8(x) => Some(i64::from(*x)),
                Value::I16(x) => Some(i64::from(*x)),
                Value::U16(x) => Some(i64::from(*x)),
                _ => None,
            })
            .collect()
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        self.meta(key)
            .map(|v| v.to_u64().map_err(|e| self.bad(format!("{key}: {e}"))))
            .transpose()
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.meta(key)
            .map(|v| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                other => Err(self.bad(format!("{key}: not a float: {other:?}"))),
            })
            .transpose()
    }

    fn architecture(&self) -> Result<&str, ModelError> {
        self.meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| self.bad("no general.architecture"))
    }

    /// The model's shape, as the equivalent `config.json` would give it.
    pub fn config(&self) -> Result<LlamaConfig, ModelError> {
        let arch = self.architecture()?.to_string();
        let (model_type, class) = match arch.as_str() {
            // llama.cpp writes Mistral models as `llama` too.
            "llama" => ("llama", "LlamaForCausalLM"),
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF architecture {other:?}; supported: llama (Llama, Mistral), qwen2"
                )))
            }
        };
        let need = |key: &str| -> Result<u64, ModelError> {
            self.meta_u64(&format!("{arch}.{key}"))?
                .ok_or_else(|| self.bad(format!("no {arch}.{key}")))
        };
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.bad("no token_embd.weight"))?;
        let vocab = embd.shape.dims().first().copied().unwrap_or(0);
        let heads = need("attention.head_count")?;
        let mut cfg = serde_json::json!({
            "model_type": model_type,
            "architectures": [class],
            "vocab_size": vocab,
            "hidden_size": need("embedding_length")?,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta_u64(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(heads),
            "max_position_embeddings": need("context_length")?,
            "rms_norm_eps": self.meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            "rope_theta": self.meta_f64(&format!("{arch}.rope.freq_base"))?.unwrap_or(10_000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "attention_bias": arch == "llama" && self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            "bos_token_id": self.meta_u64("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.meta_u64("tokenizer.ggml.eos_token_id")?,
        });
        if let Some(hd) = self.meta_u64(&format!("{arch}.attention.key_length"))? {
            cfg["head_dim"] = hd.into();
        }
        let scaling = self
            .meta(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok());
        if let Some(factors) = self.rope_factors()? {
            // Llama 3's scaling, evaluated per frequency by the converter.
            cfg["rope_scaling"] = serde_json::json!({"rope_type": "factors", "factors": factors});
        }
        match scaling.map(String::as_str) {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self
                    .meta_f64(&format!("{arch}.rope.scaling.factor"))?
                    .ok_or_else(|| self.bad("linear rope scaling without a factor"))?;
                cfg["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF rope scaling {other:?} (supported: none, linear)"
                )))
            }
        }
        LlamaConfig::from_json(&cfg.to_string()).map_err(|e| match e {
            ModelError::MalformedConfig { reason, .. } => self.bad(reason),
            other => other,
        })
    }

    /// The `rope_freqs` tensor (one divisor per rotary frequency), when present.
    fn rope_factors(&self) -> Result<Option<Vec<f64>>, ModelError> {
        let Some(info) = self.content.tensor_infos.get("rope_freqs.weight") else {
            return Ok(None);
        };
        if info.shape.rank() != 1 || info.shape.elem_count() > 4096 {
            return Err(self.bad(format!("rope_freqs has shape {:?}", info.shape.dims())));
        }
        let mut file = self.file.borrow_mut();
        let t = info
            .read(&mut *file, self.content.tensor_data_offset, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.bad(format!("rope_freqs: {e}")))?;
        Ok(Some(t.into_iter().map(f64::from).collect()))
    }

    /// Indices `N` of the `blk.N.*` tensors present.
    pub fn block_indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.content
            .tensor_infos
            .keys()
            .filter_map(|name| name.strip_prefix("blk.")?.split('.').next()?.parse().ok())
    }

    /// Bytes of the `blk.*` tensors, per block: how much a span of this file takes.
    pub fn block_bytes(&self) -> u64 {
        let mut total = 0u64;
        for (name, info) in &self.content.tensor_infos {
            if name.starts_with("blk.") {
                let d = info.ggml_dtype;
                let bytes = info.shape.elem_count() / d.block_size() * d.type_size();
                total = total.saturating_add(bytes as u64);
            }
        }
        let blocks = self
            .block_indices()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        total / (blocks.max(1) as u64)
    }

    /// `gguf:<types>` of the quantized matrices of the blocks, as a span announces it;
    /// empty when every block tensor is f32/f16/bf16.
    pub fn block_formats(&self) -> String {
        let formats: std::collections::BTreeSet<String> = self
            .content
            .tensor_infos
            .iter()
            .filter(|(name, info)| name.starts_with("blk.") && info.shape.rank() == 2)
            .map(|(_, info)| info.ggml_dtype)
            .filter(|d| !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
            .map(|d| format!("{d:?}").to_ascii_lowercase())
            .collect();
        if formats.is_empty() {
            return String::new();
        }
        format!("gguf:{}", formats.into_iter().collect::<Vec<_>>().join("+"))
    }

    /// `tokenizer.chat_template` with the BOS/EOS token strings it may write.
    pub fn chat_template(&self) -> Option<(String, Option<String>, Option<String>)> {
        let source = self
            .meta("tokenizer.chat_template")?
            .to_string()
            .ok()?
            .clone();
        let token = |key: &str| -> Option<String> {
            let id = usize::try_from(self.meta(key)?.to_u64().ok()?).ok()?;
            let tokens = self.meta("tokenizer.ggml.tokens")?.to_vec().ok()?;
            tokens.get(id)?.to_string().ok().cloned()
        };
        Some((
            source,
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        ))
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        gguf_name(hf_name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    /// Read tensor `hf_name` (checked against `shape`) onto `device`, in its stored
    /// format, with llama.cpp's q/k row permutation undone.
    pub fn tensor(
        &self,
        hf_name: &str,
        shape: &[usize],
        cfg: &LlamaConfig,
        device: &Device,
    ) -> Result<QTensor, ModelError> {
        let missing = || ModelError::MissingWeight {
            name: hf_name.to_string(),
        };
        let name = gguf_name(hf_name).ok_or_else(missing)?;
        let info = self.content.tensor_infos.get(&name).ok_or_else(missing)?;
        if info.shape.dims() != shape {
            return Err(ModelError::WeightShape {
                name: hf_name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let heads = match (self.architecture()?, hf_name) {
            ("llama", n) if n.contains(".q_proj.") => Some(cfg.num_attention_heads),
            ("llama", n) if n.contains(".k_proj.") => Some(cfg.num_kv_heads()),
            _ => None,
        };
        let read = |dev: &Device| {
            let mut file = self.file.borrow_mut();
            info.read(&mut *file, self.content.tensor_data_offset, dev)
                .map_err(|e| self.bad(format!("{name}: {e}")))
        };
        let Some(heads) = heads else {
            return read(device);
        };
        let q = read(&Device::Cpu)?;
        let rows = shape.first().copied().unwrap_or(0);
        let data = q.data()?;
        let row_bytes = data.len() / rows.max(1);
        let head_dim = rows / heads.max(1);
        let mut out = Vec::with_capacity(data.len());
        for r in 0..rows {
            let src = gguf_row(r, head_dim);
            out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
        }
        let storage = QStorage::from_data(Cow::Owned(out), device, q.dtype())?;
        Ok(QTensor::new(storage, shape)?)
    }
}

/// The row of a llama.cpp-permuted q/k matrix holding transformers' row `r`: within a
/// head, llama.cpp stores rotary pair `i` as rows `2i, 2i+1`; transformers as `i, i+d/2`.
fn gguf_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / half.max(1), within % half.max(1));
    head * head_dim + 2 * i + j
}

/// The GGUF name of a transformers tensor name, as llama.cpp's converter writes it.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{index}.{short}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_llama_cpp_writes_them() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.bias").as_deref(),
            Some("blk.12.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, d/2).swapaxes(1, 2): gguf row h*d + 2i + j holds
        // transformers row h*d + j*d/2 + i.
        let d = 8;
        for h in 0..3 {
            for i in 0..d / 2 {
                for j in 0..2 {
                    assert_eq!(gguf_row(h * d + j * d / 2 + i, d), h * d + 2 * i + j);
                }
            }
        }
    }
}
