//! The `mesh-client` binary as a user runs it: its defaults and what it prints.

use std::process::Command;

use mesh_client::SamplingParams;
use mesh_core::model::{tiny, LocalModel};

const CLI: &str = env!("CARGO_BIN_EXE_mesh-client");

/// `--temperature 0` is plain greedy decoding, as `SamplingParams::greedy` and the OpenAI
/// gateway do it: no repetition penalty unless asked for (transformers' `generate`
/// defaults to 1.0 too), so the CLI and the API give the same "greedy" text.
#[test]
fn temperature_zero_in_the_cli_is_plain_greedy() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let prompt = "the the the mesh mesh mesh";
    // What the CLI prints is the streamed text, so compare with the streamed text.
    let mut want = String::new();
    LocalModel::load_split(dir.path(), 1, &candle_core::Device::Cpu)
        .unwrap()
        .generate(prompt, &SamplingParams::greedy(40), |t| want.push_str(t))
        .unwrap();
    let out = Command::new(CLI)
        .args([
            "local",
            "--spans",
            "1",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ])
        .arg("--prompt")
        .arg(prompt)
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
    assert!(
        stdout.contains(&format!("{prompt}{want}\n--")),
        "the CLI's greedy text differs from plain greedy {want:?}:\n{stdout}"
    );
    assert_eq!(SamplingParams::default().repetition_penalty, 1.0);
}

/// The default model has learned English: what `local` (the demo's model, no flags)
/// writes is words of its training text, not noise. Sampled as a newcomer sees it.
#[test]
fn the_default_model_writes_english_words() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(CLI)
        .args(["local", "--max-tokens", "48"])
        .env("MESH_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The prompt, the text (possibly over several lines), then "-- N tokens".
    let generated = stdout
        .split_once("The mesh runs models on everyone's GPUs.")
        .and_then(|(_, rest)| rest.split_once("\n-- "))
        .map(|(text, _)| text)
        .unwrap_or_else(|| panic!("no generation in:\n{stdout}"));
    let corpus_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-core/models/corpus");
    let mut known = std::collections::HashSet::new();
    for file in std::fs::read_dir(corpus_dir).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        known.extend(words(&text));
    }
    let said = words(generated);
    let in_corpus = said.iter().filter(|w| known.contains(*w)).count();
    println!(
        "{generated:?}: {in_corpus} of {} words in the corpus",
        said.len()
    );
    assert!(said.len() >= 12, "too few words: {generated:?}");
    assert!(
        in_corpus * 10 >= said.len() * 9,
        "not English words: {generated:?}"
    );
}

/// Lower-case alphabetic words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// `mesh-client receipts` lists the newest hops first, as its help says, and `--limit`
/// keeps the newest ones.
#[test]
fn receipts_are_listed_newest_first() {
    use mesh_core::identity::Identity;
    use mesh_core::ledger::{ConfigHash, Receipt, Store, Terms};
    use mesh_core::{BlockRange, ModelId, SessionId};

    const DAY_MS: u64 = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let client = Identity::generate();
    let server = Identity::generate();
    {
        let store = Store::open(&dir.path().join("receipts")).unwrap();
        // Stored out of order: day 2, day 0, day 1 (and prefill = the day, to tell them apart).
        for day in [2, 0, 1] {
            let terms = Terms {
                session: SessionId::random(),
                client: client.peer_id(),
                server: server.peer_id(),
                model: ModelId::new(tiny::TINY_MODEL_ID),
                config_hash: ConfigHash::of(&tiny::config()).unwrap(),
                span: BlockRange::new(0, 8),
                price_per_token: 1,
            };
            let start = (20_000 + day) * DAY_MS;
            let signed = Receipt::new(terms, 10 + day, 1, start, start + 1_000, 1)
                .unwrap()
                .sign(&server.signing_key())
                .unwrap();
            store.put(&signed).unwrap();
        }
    }
    let out = Command::new(CLI)
        .args(["receipts", "--limit", "2", "--ledger-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let prefills: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" prefill ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    assert_eq!(
        prefills,
        ["12", "11"],
        "newest first, the newest two:\n{stdout}"
    );
}

/// `generate` on a mesh missing its middle span: an error naming the blocks and the
/// servers seen, or, with `--fallback local`, the text with the local hop in the route
/// print.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_names_the_missing_blocks_or_runs_them_with_fallback_local() {
    use mesh_core::local_mesh::LocalMesh;
    use mesh_core::BlockRange;

    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let spans = BlockRange::even_split(8, 3);
    let mesh = LocalMesh::start(dir.path(), &[spans[0], spans[2]])
        .await
        .unwrap();
    let generate = |fallback: &'static str| {
        let mut cmd = Command::new(CLI);
        cmd.args(["generate", "--temperature", "0", "--max-tokens", "8"])
            .args(["--discovery-secs", "2", "--fallback", fallback])
            .arg("--bootstrap")
            .arg(mesh.bootstrap_addr().to_string())
            .arg("--model-dir")
            .arg(dir.path())
            .arg("--ledger-dir")
            .arg(dir.path().join(format!("client-{fallback}")))
            .env("RUST_LOG", "error");
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let refused = generate("none").await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("no server of tiny-llama-mesh covers blocks [3, 6); 2 servers seen"),
        "{stderr}"
    );
    for (peer, _) in mesh.servers() {
        assert!(stderr.contains(&peer.to_string()), "{stderr}");
    }
    let ran = generate("local").await.unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(
        stdout.contains("  blocks [3, 6) on this client (--fallback local: no server covers them)"),
        "{stdout}"
    );
    assert!(stdout.contains("8 tokens; prefill"), "{stdout}");
    mesh.stop().await.unwrap();
}
