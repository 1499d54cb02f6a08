//! The tokenizer a GGUF file carries in its metadata, rebuilt as a Hugging Face
//! `tokenizer.json` so the same `tokenizers` code runs it.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Qwen2, Llama 3, GPT-2) is rebuilt from
//! the token list, token types and merges, with the pre-tokenizer `tokenizer.ggml.pre`
//! names. SentencePiece BPE (`"llama"`: Llama 2, Mistral) is rebuilt as transformers
//! converts it (`LlamaConverter`, legacy layout): merges from the vocabulary, ranked by the
//! score of the merged piece (how sentencepiece and llama.cpp merge), byte fallback, `▁`
//! prepended and spaces replaced by `▁`.

use serde_json::{json, Value as Json};

use super::gguf::GgufFile;
use super::ModelError;

/// GPT-2's split (`tokenizer.ggml.pre` `default` / `gpt-2`).
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's split: single digits, case-insensitive contractions.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ggml token types that are added tokens rather than BPE vocabulary.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A post-processor putting BOS first when `tokenizer.ggml.add_bos_token` says so
/// (`default` when the key is absent); null otherwise.
fn bos_template(file: &GgufFile, tokens: &[String], default: bool) -> Json {
    let add = file
        .meta_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(default);
    let bos = file
        .meta_u64_lossy("tokenizer.ggml.bos_token_id")
        .and_then(|id| {
            tokens
                .get(usize::try_from(id).ok()?)
                .map(|t| (id, t.clone()))
        });
    match (add, bos) {
        (true, Some((id, token))) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token.clone(): {"id": token, "ids": [id], "tokens": [token]}},
        }),
        _ => Json::Null,
    }
}

/// ggml token types: normal vocabulary, and the unknown token.
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;

/// `tokenizer.json` for a SentencePiece BPE vocabulary (transformers' legacy Llama form).
fn sentencepiece_json(file: &GgufFile) -> Result<String, ModelError> {
    let bad = |what: &str| ModelError::Tokenizer(format!("{}: GGUF {what}", file.path().display()));
    let tokens = file
        .meta_strings("tokenizer.ggml.tokens")
        .ok_or_else(|| bad("tokenizer.ggml.tokens missing or not strings"))?;
    let scores = file
        .meta_floats("tokenizer.ggml.scores")
        .filter(|s| s.len() == tokens.len())
        .ok_or_else(|| bad("tokenizer.ggml.scores missing or not one per token"))?;
    let types = file
        .meta_ints("tokenizer.ggml.token_type")
        .unwrap_or_default();
    let kind = |id: usize| types.get(id).copied().unwrap_or(NORMAL);
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Every split of a vocabulary piece into two pieces is a merge, ranked by the merged
    // piece's score (higher first), then by the ids (transformers' extractor).
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if kind(id) != NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..at]), ids.get(&piece[at..])) {
                merges.push((scores[id], id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
        let k = kind(id);
        if k == CONTROL || k == UNKNOWN || k == USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": k != USER_DEFINED,
            }));
        }
    }
    let unk = file
        .meta_u64_lossy("tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(usize::try_from(id).ok()?).cloned());
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        ]},
        "pre_tokenizer": null,
        "post_processor": bos_template(file, &tokens, true),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(spec.to_string())
}

/// `tokenizer.json` text for the GGUF's tokenizer; `None` when the file has none.
pub(crate) fn tokenizer_json(file: &GgufFile) -> Result<Option<String>, ModelError> {
    let Some(model) = file.meta_str("tokenizer.ggml.model") else {
        return Ok(None);
    };
    match model {
        "gpt2" => {}
        "llama" => return sentencepiece_json(file).map(Some),
        _ => {
            return Err(ModelError::Tokenizer(format!(
                "{}: GGUF tokenizer model {model:?} is not read (byte-level BPE \"gpt2\" and \
                 SentencePiece \"llama\" are); put the model's tokenizer.json beside the file",
                file.path().display()
            )))
        }
    }
    let pre = file.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    let split = match pre {
        "default" | "gpt-2" | "gpt2" => GPT2_SPLIT,
        "qwen2" => QWEN2_SPLIT,
        "llama-bpe" | "llama3" | "smaug-bpe" => LLAMA3_SPLIT,
        other => {
            return Err(ModelError::Tokenizer(format!(
                "{}: GGUF pre-tokenizer {other:?} is not known (qwen2, llama-bpe, gpt-2 are); \
                 put the model's tokenizer.json beside the file",
                file.path().display()
            )))
        }
    };
    let bad = |what: &str| ModelError::Tokenizer(format!("{}: GGUF {what}", file.path().display()));
    let tokens = file
        .meta_strings("tokenizer.ggml.tokens")
        .ok_or_else(|| bad("tokenizer.ggml.tokens missing or not strings"))?;
    let merges = file
        .meta_strings("tokenizer.ggml.merges")
        .unwrap_or_default();
    let types = file
        .meta_ints("tokenizer.ggml.token_type")
        .unwrap_or_default();

    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
        let kind = types.get(id).copied().unwrap_or(1);
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": kind == CONTROL,
            }));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| bad(&format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<_, _>>()?;
    let post = bos_template(file, &tokens, false);
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        ]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(Some(spec.to_string()))
}
