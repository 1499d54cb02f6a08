//! A model directory with a chat template (`tokenizer_config.json`): the client's chats use
//! the template, their token ids carry one BOS, generation over the mesh follows those ids,
//! and a template's refusal reaches callers (and the OpenAI gateway) as a typed error.

use futures::StreamExt;
use mesh_client::{ChatMessage, ClientError, MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, LocalModel, ModelError};
use mesh_core::BlockRange;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// TinyLlama-1.1B-Chat-v1.0's template with `{{ bos_token }}` in front, so the template
/// writes the BOS as Llama 3's and Mistral's do.
const ZEPHYR_WITH_BOS: &str = "{{ bos_token }}{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/// Mistral-7B-Instruct-v0.2's template.
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

fn write_template(dir: &std::path::Path, template: &str) {
    let config =
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

async fn client(mesh: &LocalMesh, dir: &std::path::Path) -> MeshClient {
    MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir)
        .build()
        .await
        .unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_use_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    write_template(dir.path(), ZEPHYR_WITH_BOS);
    let mesh = LocalMesh::start(dir.path(), &BlockRange::even_split(8, 2))
        .await
        .unwrap();
    let client = client(&mesh, dir.path()).await;

    let chat = vec![msg("system", "Be brief."), msg("user", "Hi!")];
    let want = "<s><|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\n";
    assert_eq!(client.chat_prompt(&chat).unwrap(), want);

    // One BOS, the template's: the same ids as the text after "<s>" with BOS added.
    let ids = client.chat_ids(&chat).unwrap();
    let bos = 1;
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1, "{ids:?}");
    assert_eq!(ids, client.prompt_ids(&want["<s>".len()..]).unwrap());

    // Generation over the mesh follows exactly those ids.
    let local = LocalModel::load_split(dir.path(), 1, &candle_core::Device::Cpu).unwrap();
    let mut params = SamplingParams::greedy(8);
    params.stop_tokens = vec![2];
    let want_tokens = local
        .generate_ids(ids, &params, |_| {})
        .unwrap()
        .generated()
        .to_vec();
    let got: Vec<u32> = client
        .chat(&chat, SamplingParams::greedy(8))
        .await
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect()
        .await;
    assert!(!got.is_empty());
    assert_eq!(got, want_tokens);

    // A template that refuses the chat: a typed error, and a 400 from the gateway.
    write_template(dir.path(), MISTRAL);
    let strict = self::client(&mesh, dir.path()).await;
    let bad = vec![msg("user", "a"), msg("user", "b")];
    let err = strict
        .chat(&bad, SamplingParams::greedy(4))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::Model(ModelError::ChatRejected(_))),
        "{err}"
    );
    let (status, body) = post_chat(strict, &bad).await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request", "{body}");
    assert!(body.contains("roles must alternate"), "{body}");

    mesh.stop().await.unwrap();
}

/// POST a chat to the gateway over a raw socket; the status line and the body.
async fn post_chat(client: MeshClient, messages: &[ChatMessage]) -> (String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve(client, listener, async {
        let _ = stopped.await;
    }));
    let body = serde_json::json!({"messages": messages}).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}
