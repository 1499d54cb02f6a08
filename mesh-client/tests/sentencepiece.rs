//! Streaming text with a sentencepiece tokenizer (Llama 2's kind: byte fallback, a
//! Metaspace pre-tokenizer, a decoder that strips the leading space of a text): what is
//! streamed after the prompt is what decoding the whole sequence shows after it, so the
//! continuation's first word is not glued to the prompt's last.

use std::process::Command;

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, LocalModel, MeshTokenizer, TextStream};
use mesh_core::BlockRange;

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");

/// A `tokenizer.json` as transformers converts a Llama sentencepiece model
/// (`legacy=False`), over the tiny model's 259 ids: `<unk> <s> </s>`, the 128 ASCII byte
/// tokens `<0x00>..<0x7F>` (so any text it can decode is valid UTF-8), then 128 pieces,
/// most of them word starts (`▁when`, `▁tree`).
fn sentencepiece_json() -> String {
    let mut pieces: Vec<String> = ["▁", "▁when", "▁tree", "trai", "tr", "ai", ",", "."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pieces.extend(('0'..='9').map(String::from));
    pieces.extend(('a'..='z').map(String::from));
    pieces.extend(('a'..='z').map(|c| format!("▁{c}")));
    'fill: for a in 'a'..='z' {
        for b in ['a', 'e', 'i', 'o', 'u', 'n', 's', 't'] {
            if pieces.len() == 128 {
                break 'fill;
            }
            pieces.push(format!("▁{a}{b}"));
        }
    }
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*tok).into(), id.into());
        added.push(
            serde_json::json!({"id": id, "content": tok, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    for b in 0..128u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.clone(), (131 + i).into());
    }
    assert_eq!(vocab.len(), 259, "the tiny model has 259 ids");
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    })
    .to_string()
}

fn tokenizer() -> MeshTokenizer {
    MeshTokenizer::from_json(&sentencepiece_json()).unwrap()
}

/// The tiny model with the sentencepiece tokenizer in place of its byte-level one.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), sentencepiece_json()).unwrap();
    dir
}

/// Text of `generated` after `prompt`, as decoding the whole sequence shows it.
fn continuation(tok: &MeshTokenizer, prompt: &[u32], generated: &[u32]) -> String {
    let whole: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let whole = tok.decode(&whole).unwrap();
    let prompt = tok.decode(prompt).unwrap();
    assert!(whole.starts_with(&prompt), "{whole:?} {prompt:?}");
    whole[prompt.len()..].to_string()
}

#[test]
fn streamed_text_is_the_whole_decode_after_the_prompt() {
    let tok = tokenizer();
    let prompt = tok.encode("1820, when").unwrap();
    assert_eq!(tok.decode(&prompt).unwrap(), "1820, when");
    let id = |p: &str| tok.token_id(p).unwrap();
    let generated = [id("▁tree"), id("trai"), id("<0x21>"), id("▁when")];
    let mut stream = TextStream::new(tok.clone(), &prompt);
    let streamed: String = generated
        .iter()
        .filter_map(|&t| stream.push(t).unwrap())
        .collect();
    assert_eq!(
        format!("1820, when{streamed}"),
        "1820, when treetrai! when",
        "streamed {streamed:?}"
    );
    assert_eq!(streamed, continuation(&tok, &prompt, &generated));
}

/// A prompt whose first greedy token starts a word (`▁…`), where streaming from the
/// continuation alone would lose its space; and the tokens generated after it.
fn prompt_opening_a_word(dir: &std::path::Path) -> (String, Vec<u32>, Vec<u32>) {
    let model = LocalModel::load_split(dir, 1, &candle_core::Device::Cpu).unwrap();
    let tok = tokenizer();
    for prompt in [
        "1820, when",
        "the mesh",
        "a tree",
        "tr ai",
        "on a",
        "in 1999, the",
    ] {
        let out = model
            .generate(prompt, &SamplingParams::greedy(24), |_| {})
            .unwrap();
        let first = out.tokens.first().copied().unwrap_or(0);
        let first_piece = tok.decode(&[first]).unwrap();
        let with_context = continuation(&tok, &out.prompt_tokens, &[first]);
        if with_context.starts_with(' ') && !first_piece.starts_with(' ') {
            return (prompt.to_string(), out.prompt_tokens, out.tokens);
        }
    }
    panic!("no candidate prompt makes the tiny model open a word first");
}

#[test]
fn cli_prints_the_whole_decode() {
    let dir = model_dir();
    let (prompt, prompt_ids, generated) = prompt_opening_a_word(dir.path());
    let want = format!(
        "{prompt}{}\n--",
        continuation(&tokenizer(), &prompt_ids, &generated)
    );
    let out = Command::new(CLI)
        .args([
            "local",
            "--spans",
            "2",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ])
        .arg("--prompt")
        .arg(&prompt)
        .arg("--model-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&want), "want {want:?} in:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_client_streams_the_whole_decode() {
    let dir = model_dir();
    let (prompt, prompt_ids, generated) = prompt_opening_a_word(dir.path());
    let mesh = LocalMesh::start(dir.path(), &BlockRange::even_split(8, 2))
        .await
        .unwrap();
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir.path())
        .build()
        .await
        .unwrap();
    let tokens: Vec<_> = client
        .generate(&prompt, SamplingParams::greedy(24))
        .await
        .unwrap()
        .map(|t| t.unwrap())
        .collect()
        .await;
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), generated);
    let streamed: String = tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(
        streamed,
        continuation(&tokenizer(), &prompt_ids, &generated)
    );
    mesh.stop().await.unwrap();
}
