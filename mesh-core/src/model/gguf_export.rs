//! Writing a Llama-architecture safetensors model as a llama.cpp-layout GGUF file.
//!
//! What tests and examples use to make GGUF models of their own (the tiny model, a
//! random-weight model) without llama.cpp: the same names, metadata keys and q/k row
//! permutation as llama.cpp's converter, projections quantized with candle's quantizer
//! (so the file holds exactly the bytes on-load quantization makes), everything else f32.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf::gguf_name;
use super::{ModelError, ModelFiles, Quantization, WeightFormat, Weights};

/// Write the model in `files` (safetensors, `llama`/`mistral`) to `path` as GGUF, block
/// projections quantized to `quantize` where their rows allow, the rest f32.
pub fn write_gguf(
    files: &ModelFiles,
    quantize: Quantization,
    path: &Path,
) -> Result<(), ModelError> {
    let cfg = &files.config;
    if files.format != WeightFormat::Safetensors
        || !matches!(cfg.model_type.as_str(), "llama" | "mistral")
        || cfg.qkv_bias()
        || cfg.rope_scaling.is_some()
    {
        return Err(ModelError::Unsupported(
            "GGUF export takes a Llama/Mistral safetensors model without biases or rope scaling"
                .into(),
        ));
    }
    let w = Weights::open(files, DType::F32, &Device::Cpu)?;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    let mut put = |name: &str, t: Tensor, format: GgmlDType| -> Result<(), ModelError> {
        let gguf = gguf_name(name).ok_or_else(|| ModelError::MissingWeight {
            name: name.to_string(),
        })?;
        tensors.insert(gguf, QTensor::quantize(&t, format)?);
        Ok(())
    };
    put(
        "model.embed_tokens.weight",
        w.get("model.embed_tokens.weight", &[v, h])?,
        GgmlDType::F32,
    )?;
    put(
        "model.norm.weight",
        w.get("model.norm.weight", &[h])?,
        GgmlDType::F32,
    )?;
    if w.contains("lm_head.weight") {
        put(
            "lm_head.weight",
            w.get("lm_head.weight", &[v, h])?,
            GgmlDType::F32,
        )?;
    }
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("{p}.{norm}.weight");
            put(&name, w.get(&name, &[h])?, GgmlDType::F32)?;
        }
        let matrices = [
            ("self_attn.q_proj", nh * hd, h, Some(nh)),
            ("self_attn.k_proj", nkv * hd, h, Some(nkv)),
            ("self_attn.v_proj", nkv * hd, h, None),
            ("self_attn.o_proj", h, nh * hd, None),
            ("mlp.gate_proj", i, h, None),
            ("mlp.up_proj", i, h, None),
            ("mlp.down_proj", h, i, None),
        ];
        for (module, rows, cols, heads) in matrices {
            let name = format!("{p}.{module}.weight");
            let mut t = w.get(&name, &[rows, cols])?;
            if let Some(heads) = heads {
                t = permute_rows(&t, heads)?;
            }
            let format = quantize.ggml_for(cols).unwrap_or(GgmlDType::F32);
            put(&name, t, format)?;
        }
    }
    let u = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let mut meta = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.embedding_length", u(h)),
        ("llama.feed_forward_length", u(i)),
        ("llama.attention.head_count", u(nh)),
        ("llama.attention.head_count_kv", u(nkv)),
        ("llama.attention.key_length", u(hd)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
    ];
    if let Some(bos) = cfg.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id", Value::U32(bos)));
    }
    if let Some(&eos) = cfg.eos_tokens().first() {
        meta.push(("tokenizer.ggml.eos_token_id", Value::U32(eos)));
    }
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let list: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let io = |source| ModelError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("gguf.tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    gguf_file::write(&mut file, &meta, &list).map_err(|e| ModelError::Write {
        path: tmp.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// llama.cpp's `LlamaModel.permute` of a `[heads * d, in]` matrix: within each head,
/// transformers' rows `i` and `i + d/2` (a rotary pair) become rows `2i` and `2i + 1`.
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let rows = t.dim(0)?;
    let d = rows / heads.max(1);
    let idx = (0..rows)
        .map(|g| {
            let (head, w) = (g / d, g % d);
            u32::try_from(head * d + (w % 2) * (d / 2) + w / 2).unwrap_or(u32::MAX)
        })
        .collect::<Vec<u32>>();
    Ok(t.index_select(&Tensor::new(idx, t.device())?, 0)?)
}
