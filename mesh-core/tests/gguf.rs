//! GGUF files as a model source. Files written by the `gguf` Python package from the
//! transformers fixtures (`scripts/make_gguf_fixture.py`, as llama.cpp's converter lays
//! them out, q/k permuted) must give the tokens the same quantization made on load gives;
//! K-quant files written here with candle's GGUF writer cover Q4_K, Q5_K and Q6_K.

mod common;
use common::{larger_model, relative_error};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use mesh_core::model::{
    tiny, ChatMessage, ClientHead, ModelFiles, Quantization, SpanModel, WeightFormat,
};
use mesh_core::BlockRange;

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 128, 64, 7, 200, 31, 5];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy tokens and the prompt's last logits, the head from `head_files`, the blocks as
/// two spans of `span_files` (quantized on load to `quant`).
fn run(
    head_files: &ModelFiles,
    span_files: &ModelFiles,
    quant: Option<Quantization>,
    steps: usize,
) -> (Vec<u32>, Vec<f32>, Option<String>) {
    let head = ClientHead::load(head_files, DType::F32, &Device::Cpu).unwrap();
    let spans: Vec<SpanModel> = BlockRange::even_split(span_files.config.num_blocks(), 2)
        .into_iter()
        .map(|r| SpanModel::load_quantized(span_files, r, DType::F32, quant, &Device::Cpu).unwrap())
        .collect();
    let label = spans[0].quantization().map(str::to_string);
    let mut caches: Vec<_> = spans
        .iter()
        .map(|s| s.new_cache(PROMPT.len() + steps).unwrap())
        .collect();
    let (mut input, mut pos, mut out, mut first) = (PROMPT.to_vec(), 0, Vec::new(), None);
    for _ in 0..steps {
        let mut hidden = head.embed(&input).unwrap();
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            hidden = span.forward(cache, &hidden, pos).unwrap();
        }
        let logits = head.last_logits(&hidden).unwrap();
        pos += input.len();
        let next = argmax(&logits);
        first.get_or_insert(logits);
        out.push(next);
        input = vec![next];
    }
    (out, first.unwrap(), label)
}

#[test]
fn python_written_q8_0_gguf_matches_on_load_q8_0() {
    for (gguf, dir) in [
        ("llama_gqa-q8_0.gguf", "hf_llama_gqa"),
        ("llama3_tied-q8_0.gguf", "hf_llama3_tied"),
        ("qwen2_tied-q8_0.gguf", "hf_qwen2_tied"),
    ] {
        let g = ModelFiles::open(&fixtures().join("gguf").join(gguf)).unwrap();
        let st = ModelFiles::open(&fixtures().join(dir)).unwrap();
        assert_eq!(g.format, WeightFormat::Gguf);
        g.check_weights().unwrap();
        let (a, b) = (&g.config, &st.config);
        assert_eq!(
            (
                a.model_type.as_str(),
                a.vocab_size,
                a.hidden_size,
                a.intermediate_size
            ),
            (
                b.model_type.as_str(),
                b.vocab_size,
                b.hidden_size,
                b.intermediate_size
            )
        );
        assert_eq!(
            (
                a.num_hidden_layers,
                a.num_kv_heads(),
                a.head_dim(),
                a.tie_word_embeddings
            ),
            (
                b.num_hidden_layers,
                b.num_kv_heads(),
                b.head_dim(),
                b.tie_word_embeddings
            )
        );
        assert_eq!(
            (a.rope_theta, a.rms_norm_eps as f32),
            (b.rope_theta, b.rms_norm_eps as f32)
        );
        assert_eq!(a.qkv_bias(), b.qkv_bias());

        let (gguf_tokens, gguf_logits, label) = run(&g, &g, None, 32);
        let (onload_tokens, onload_logits, _) = run(&st, &st, Some(Quantization::Q8_0), 32);
        let err = relative_error(&gguf_logits, &onload_logits);
        eprintln!("{gguf}: {label:?}, logits rel err vs on-load q8_0 {err:.2e}");
        assert_eq!(label.as_deref(), Some("gguf:q8_0"));
        assert_eq!(gguf_tokens, onload_tokens, "{gguf}");
        assert!(err < 1e-3, "{gguf}: {err}");
    }
}

#[test]
fn python_written_q4_0_f16_gguf_stays_close_to_f32() {
    let g = ModelFiles::open(&fixtures().join("gguf/llama_gqa-q4_0-f16.gguf")).unwrap();
    let st = ModelFiles::open(&fixtures().join("hf_llama_gqa")).unwrap();
    let (tokens, logits, label) = run(&g, &g, None, 16);
    let (want, want_logits, _) = run(&st, &st, None, 16);
    let err = relative_error(&logits, &want_logits);
    let same = tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
    eprintln!("llama_gqa-q4_0-f16.gguf: {label:?}, logits rel err vs f32 {err:.2e}, free-running greedy equal for {same}/16 tokens");
    assert_eq!(label.as_deref(), Some("gguf:q4_0"));
    // 4-bit weights (and f16 embeddings) on a random-weight model: close, not equal.
    assert!(err < 0.3, "{err}");
    assert_eq!(tokens[0], want[0]);
}

#[test]
fn the_chat_template_comes_from_the_gguf() {
    let g = ModelFiles::open(&fixtures().join("gguf/qwen2_tied-q8_0.gguf")).unwrap();
    let t = g.chat_template().unwrap().expect("tokenizer.chat_template");
    let chat = [ChatMessage {
        role: "user".into(),
        content: "Hi!".into(),
    }];
    assert!(t
        .render(&chat, true)
        .unwrap()
        .ends_with("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"));
    let g = ModelFiles::open(&fixtures().join("gguf/llama_gqa-q8_0.gguf")).unwrap();
    assert!(g.chat_template().unwrap().is_none());
}

/// llama.cpp's q/k permutation (`LlamaModel.permute`) of a `[heads * d, in]` matrix.
fn permute(t: &Tensor, heads: usize) -> Tensor {
    let rows = t.dim(0).unwrap();
    let d = rows / heads;
    let idx: Vec<u32> = (0..rows)
        .map(|g| {
            let (h, w) = (g / d, g % d);
            (h * d + (w % 2) * d / 2 + w / 2) as u32
        })
        .collect();
    t.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0)
        .unwrap()
}

/// Write `files` (a llama safetensors model) as a llama GGUF with block projections in
/// `proj` and everything else f32, with candle's GGUF writer.
fn write_gguf(files: &ModelFiles, proj: GgmlDType, path: &Path) {
    let cfg = &files.config;
    let st = candle_core::safetensors::load(&files.weight_files[0], &Device::Cpu).unwrap();
    let names: Vec<(String, String)> = st
        .keys()
        .map(|hf| {
            let short = hf
                .replace("model.embed_tokens", "token_embd")
                .replace("model.norm", "output_norm")
                .replace("lm_head", "output")
                .replace("model.layers.", "blk.")
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("input_layernorm", "attn_norm");
            (hf.clone(), short)
        })
        .collect();
    let mut tensors: HashMap<String, QTensor> = HashMap::new();
    for (hf, short) in &names {
        let mut t = st[hf].clone();
        if hf.ends_with("q_proj.weight") {
            t = permute(&t, cfg.num_attention_heads);
        }
        if hf.ends_with("k_proj.weight") {
            t = permute(&t, cfg.num_kv_heads());
        }
        let dtype = if hf.starts_with("model.layers.") && t.rank() == 2 {
            proj
        } else {
            GgmlDType::F32
        };
        tensors.insert(short.clone(), QTensor::quantize(&t, dtype).unwrap());
    }
    let u = |v: usize| Value::U32(v as u32);
    let meta = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads())),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let list: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &list).unwrap();
}

#[test]
fn k_quant_ggufs_load_and_q4k_equals_on_load_q4k() {
    let dir = tempfile::tempdir().unwrap();
    let st = ModelFiles::open(&larger_model(&dir.path().join("st"))).unwrap();
    let (want, want_logits, _) = run(&st, &st, None, 16);
    let (q4_tokens, q4_logits, _) = run(&st, &st, Some(Quantization::Q4K), 16);
    for (dtype, name) in [
        (GgmlDType::Q4K, "q4k"),
        (GgmlDType::Q5K, "q5k"),
        (GgmlDType::Q6K, "q6k"),
    ] {
        let path = dir.path().join(format!("model-{name}.gguf"));
        write_gguf(&st, dtype, &path);
        let g = ModelFiles::open(&path).unwrap();
        g.check_weights().unwrap();
        let (tokens, logits, label) = run(&st, &g, None, 16);
        assert_eq!(label.as_deref(), Some(format!("gguf:{name}").as_str()));
        let err = relative_error(&logits, &want_logits);
        let same = tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{name} GGUF: logits rel err vs f32 {err:.2e}, free-running greedy equal for {same}/16 tokens");
        assert!(err < 0.3, "{name}: {err}");
        if dtype == GgmlDType::Q4K {
            // The same quantizer on the same (un-permuted) rows: the same model.
            assert_eq!(tokens, q4_tokens);
            assert!(relative_error(&logits, &q4_logits) < 1e-5);
            // A span reads only its blocks' tensors, as many bytes as on-load q4k.
            let r = BlockRange::new(2, 4);
            let bytes = |f: &ModelFiles, q| {
                SpanModel::load_quantized(f, r, DType::F32, q, &Device::Cpu)
                    .unwrap()
                    .weight_bytes()
            };
            assert_eq!(bytes(&g, None), bytes(&st, Some(Quantization::Q4K)));
        }
    }
}

#[test]
fn unsupported_gguf_architectures_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("gemma2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    let err = ModelFiles::open(&path).unwrap_err().to_string();
    assert!(err.contains("gemma2") && err.contains("qwen2"), "{err}");
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    let err = ModelFiles::open(&path).unwrap_err().to_string();
    assert!(err.contains("m.gguf"), "{err}");
}

#[test]
fn an_exported_gguf_of_the_tiny_model_is_on_load_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    let st = ModelFiles::open(&tiny::ensure(&dir.path().join("tiny")).unwrap()).unwrap();
    let path = dir.path().join("tiny-q8_0.gguf");
    mesh_core::model::write_gguf(&st, Quantization::Q8_0, &path).unwrap();
    let g = ModelFiles::open(&path).unwrap();
    g.check_weights().unwrap();
    assert_eq!(g.config.num_blocks(), st.config.num_blocks());
    let (tokens, logits, label) = run(&g, &g, None, 16);
    let (want, want_logits, _) = run(&st, &st, Some(Quantization::Q8_0), 16);
    assert_eq!(label.as_deref(), Some("gguf:q8_0"));
    assert_eq!(tokens, want);
    assert!(relative_error(&logits, &want_logits) < 1e-5);
    // Not a Llama safetensors model: refused, nothing written.
    let err = mesh_core::model::write_gguf(&g, Quantization::Q8_0, &dir.path().join("x.gguf"));
    assert!(err.is_err() && !dir.path().join("x.gguf").exists());
}

/// A byte-level BPE tokenizer (trained by `tokenizers` with Qwen2's pre-tokenizer) stored
/// as GGUF metadata the way llama.cpp's converter stores it: rebuilt, it encodes and
/// decodes as its tokenizer.json does.
#[test]
fn a_gpt2_bpe_tokenizer_is_rebuilt_from_gguf_metadata() {
    let dir = fixtures().join("gguf");
    let g = ModelFiles::open(&dir.join("tokenizer-gpt2.gguf")).unwrap();
    assert!(!g.tokenizer_path().exists(), "no tokenizer.json beside it");
    let from_gguf = g.tokenizer().unwrap().expect("a tokenizer in the metadata");
    let want =
        mesh_core::model::MeshTokenizer::from_file(&dir.join("tokenizer-gpt2.json")).unwrap();
    for text in [
        "The mesh runs models on everyone's GPUs.",
        "Hello, world! It'S 2026: 1234567 tokens, we'll see.",
        "  indented   text\n\nwith newlines\r\n and\ttabs  ",
        "café naïve 東京 данные 😀",
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    ] {
        let ids = want.encode(text).unwrap();
        assert_eq!(from_gguf.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(from_gguf.decode(&ids).unwrap(), want.decode(&ids).unwrap());
    }
    assert_eq!(
        from_gguf.token_id("<|im_end|>"),
        want.token_id("<|im_end|>")
    );
    // No tokenizer metadata: none.
    let py = fixtures().join("gguf/llama_gqa-q8_0.gguf");
    assert!(ModelFiles::open(&py)
        .unwrap()
        .tokenizer()
        .unwrap()
        .is_none());
    // An unknown tokenizer model is refused with what to do instead.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rwkv.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let s = |v: &str| Value::String(v.into());
    let meta = [
        ("general.architecture", s("llama")),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(8)),
        ("llama.feed_forward_length", Value::U32(8)),
        ("llama.attention.head_count", Value::U32(2)),
        ("tokenizer.ggml.model", s("rwkv")),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &meta, &[("token_embd.weight", &t)]).unwrap();
    let err = ModelFiles::open(&path)
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"rwkv\"") && err.contains("tokenizer.json"),
        "{err}"
    );
}

/// A SentencePiece BPE vocabulary with byte fallback (Llama 2's kind), trained by
/// sentencepiece and stored as llama.cpp's converter stores it (tokens, scores, types):
/// rebuilt, it encodes as sentencepiece itself does, BOS first.
#[test]
fn a_sentencepiece_tokenizer_is_rebuilt_from_gguf_metadata() {
    let dir = fixtures().join("gguf");
    let g = ModelFiles::open(&dir.join("tokenizer-spm.gguf")).unwrap();
    let tok = g.tokenizer().unwrap().expect("a tokenizer in the metadata");
    let expected: std::collections::BTreeMap<String, Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tokenizer-spm.expected.json")).unwrap(),
    )
    .unwrap();
    assert!(expected.len() >= 5);
    for (text, ids) in &expected {
        assert_eq!(&tok.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(&tok.decode(&ids[1..]).unwrap(), text, "{text:?}");
    }
}
