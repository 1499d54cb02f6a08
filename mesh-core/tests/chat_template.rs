//! Real instruct models' chat templates, read from a model directory as HF writes it and
//! rendered as HF's `apply_chat_template` renders them. Expected strings are written from
//! each template's definition (and match Python Jinja2 with HF's settings: trim_blocks,
//! lstrip_blocks).

use std::path::Path;

use mesh_core::model::{tiny, ChatMessage, ChatTemplate, MeshTokenizer, ModelError};
use serde_json::json;

/// TinyLlama-1.1B-Chat-v1.0 (Zephyr layout), verbatim from its tokenizer_config.json.
const TINYLLAMA: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/// Meta-Llama-3-8B-Instruct, verbatim from its tokenizer_config.json.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Mistral-7B-Instruct-v0.2, verbatim from its tokenizer_config.json.
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// Qwen2.5-Instruct's template (tools branch included), as its tokenizer_config.json holds it.
const QWEN25: &str = include_str!("fixtures/chat/qwen2.5-instruct.jinja");

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs
        .iter()
        .map(|(role, content)| ChatMessage {
            role: (*role).into(),
            content: (*content).into(),
        })
        .collect()
}

/// A model directory holding the tiny model's tokenizer and `tokenizer_config`.
fn model_dir(tokenizer_config: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tiny::tokenizer_json()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(tokenizer_config).unwrap(),
    )
    .unwrap();
    dir
}

fn load(dir: &Path) -> ChatTemplate {
    ChatTemplate::from_model_dir(dir)
        .unwrap()
        .expect("a template")
}

#[test]
fn tinyllama_zephyr_template() {
    let dir = model_dir(&json!({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": TINYLLAMA,
    }));
    let t = load(dir.path());
    let chat = msgs(&[
        ("system", "You are a friendly chatbot."),
        ("user", "Hi!"),
        ("assistant", "Hello, friend."),
        ("user", "Tell me a joke."),
    ]);
    assert_eq!(
        t.render(&chat, true).unwrap(),
        "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHi!</s>\n\
         <|assistant|>\nHello, friend.</s>\n<|user|>\nTell me a joke.</s>\n<|assistant|>\n"
    );
    assert_eq!(
        t.render(&msgs(&[("user", "Hi!")]), false).unwrap(),
        "<|user|>\nHi!</s>\n"
    );
}

#[test]
fn llama3_instruct_template_with_added_token_objects() {
    // Tokens as AddedToken objects, the way many tokenizer_config.json files store them.
    let added = |content: &str| {
        json!({"__type": "AddedToken", "content": content, "lstrip": false,
               "normalized": false, "rstrip": false, "single_word": false})
    };
    let dir = model_dir(&json!({
        "bos_token": added("<|begin_of_text|>"),
        "eos_token": added("<|eot_id|>"),
        "chat_template": LLAMA3,
    }));
    let t = load(dir.path());
    assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(t.eos_token(), Some("<|eot_id|>"));
    let chat = msgs(&[("system", "You are terse."), ("user", "  What is 2+2?\n")]);
    assert_eq!(
        t.render(&chat, true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(
        t.render(&msgs(&[("user", "Hi")]), false).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    );
}

#[test]
fn mistral_instruct_template_and_its_raise_exception() {
    let dir =
        model_dir(&json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL}));
    let t = load(dir.path());
    let chat = msgs(&[
        ("user", "Hello"),
        ("assistant", "Hi there"),
        ("user", "How are you?"),
    ]);
    assert_eq!(
        t.render(&chat, true).unwrap(),
        "<s>[INST] Hello [/INST]Hi there</s>[INST] How are you? [/INST]"
    );

    let err = t
        .render(&msgs(&[("user", "a"), ("user", "b")]), true)
        .unwrap_err();
    match err {
        ModelError::ChatRejected(msg) => assert_eq!(
            msg,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected ChatRejected, got {other:?}"),
    }
    let err = t
        .render(&msgs(&[("user", "a"), ("tool", "b")]), true)
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::ChatRejected(m) if m == "Only user and assistant roles are supported!"),
        "{err:?}"
    );
    let err = t.render(&msgs(&[("tool", "b")]), true).unwrap_err();
    assert!(matches!(err, ModelError::ChatRejected(_)), "{err:?}");
}

#[test]
fn python_string_methods_work() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.content.startswith('/') %}[cmd]{% endif %}\
         {{ m.role.title() }}: {{ m.content.strip() }}|{{ m.content.upper().strip() }}\n{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let chat = msgs(&[("user", "  hi there "), ("tool", "/run x")]);
    assert_eq!(
        t.render(&chat, true).unwrap(),
        "User: hi there|HI THERE\n[cmd]Tool: /run x|/RUN X\n"
    );
}

#[test]
fn list_form_picks_the_default_template() {
    let dir = model_dir(&json!({
        "bos_token": "<s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{{ messages | length }} messages"},
        ],
    }));
    let t = load(dir.path());
    assert_eq!(
        t.render(&msgs(&[("user", "a"), ("assistant", "b")]), true)
            .unwrap(),
        "<s>2 messages"
    );

    let dir = model_dir(&json!({"chat_template": [{"name": "tool_use", "template": "T"}]}));
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MalformedConfig { .. }), "{err:?}");
}

#[test]
fn chat_template_jinja_file_wins_over_the_config() {
    let dir = model_dir(&json!({"eos_token": "</s>", "chat_template": "from config"}));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "from file{{ eos_token }}\n",
    )
    .unwrap();
    assert_eq!(
        load(dir.path())
            .render(&msgs(&[("user", "x")]), true)
            .unwrap(),
        "from file</s>"
    );
}

#[test]
fn no_template_is_none() {
    let empty = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_model_dir(empty.path())
        .unwrap()
        .is_none());
    let dir = model_dir(&json!({"bos_token": "<s>", "eos_token": "</s>"}));
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
    let dir = model_dir(&json!({"chat_template": null}));
    assert!(ChatTemplate::from_model_dir(dir.path()).unwrap().is_none());
}

#[test]
fn bad_files_are_typed_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");

    std::fs::write(&path, "{\"chat_template\": \"x\",").unwrap();
    match ChatTemplate::from_model_dir(dir.path()).unwrap_err() {
        ModelError::MalformedConfig { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected MalformedConfig, got {other:?}"),
    }

    std::fs::write(&path, r#"{"chat_template": 7}"#).unwrap();
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MalformedConfig { .. }), "{err:?}");

    std::fs::write(&path, r#"{"bos_token": 1, "chat_template": "x"}"#).unwrap();
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("bos_token"), "{err}");

    // A template that does not compile.
    std::fs::write(&path, r#"{"chat_template": "{% for m in messages %}{{ m"}"#).unwrap();
    match ChatTemplate::from_model_dir(dir.path()).unwrap_err() {
        ModelError::BadChatTemplate { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected BadChatTemplate, got {other:?}"),
    }

    // Larger than the bound: refused before parsing.
    let big = format!(
        "{{\"chat_template\": \"{}\"}}",
        "x".repeat(mesh_core::model::chat::MAX_TEMPLATE_FILE_BYTES as usize)
    );
    std::fs::write(&path, big).unwrap();
    let err = ChatTemplate::from_model_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::MalformedConfig { reason, .. } if reason.contains("larger")),
        "{err:?}"
    );
}

#[test]
fn render_failures_are_typed_errors() {
    let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", None, None).unwrap();
    let err = t.render(&msgs(&[("user", "x")]), true).unwrap_err();
    assert!(matches!(err, ModelError::ChatRender(_)), "{err:?}");

    // Without a bos_token in the config it renders as nothing (as in HF), not "none".
    let t = ChatTemplate::new("{{ bos_token }}[{{ messages[0].content }}]", None, None).unwrap();
    assert_eq!(t.render(&msgs(&[("user", "x")]), true).unwrap(), "[x]");
}

#[test]
fn encoding_a_rendered_chat_has_one_bos() {
    let dir =
        model_dir(&json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL}));
    let template = load(dir.path());
    let tokenizer = MeshTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let bos = tokenizer.token_id("<s>").unwrap();
    let chat = msgs(&[("user", "Hi")]);
    let text = template.render(&chat, true).unwrap();
    assert_eq!(text, "<s>[INST] Hi [/INST]");

    // The plain encoder adds its own BOS in front of the template's: the double BOS.
    let plain = tokenizer.encode(&text).unwrap();
    assert_eq!(&plain[..2], &[bos, bos]);

    let ids = template.encode(&tokenizer, &chat, true).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1, "{ids:?}");
    assert_eq!(ids, plain[1..].to_vec());
    assert_eq!(tokenizer.decode(&ids).unwrap(), "[INST] Hi [/INST]");
}

/// Expected strings printed by transformers 5.24's `render_jinja_template` (the function
/// behind `apply_chat_template`) with `add_generation_prompt=True`.
#[test]
fn qwen25_instruct_template_matches_transformers() {
    let dir = model_dir(&json!({"eos_token": "<|im_end|>", "chat_template": QWEN25}));
    let t = load(dir.path());
    assert_eq!(
        t.render(&msgs(&[("user", "Hi!")]), true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let chat = msgs(&[
        ("system", "Be brief."),
        ("user", "Hi!"),
        ("assistant", "Hello."),
        ("user", "2+2?"),
    ]);
    assert_eq!(
        t.render(&chat, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}
