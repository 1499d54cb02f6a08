//! Receipts over the real session protocol: a generation through 3 billing servers
//! leaves each side with countersigned receipts whose token counts match what ran.

use std::time::Duration;

use candle_core::{DType, Device};
use mesh_core::ledger::{ConfigHash, Store};
use mesh_core::local_mesh::{loopback_config, LocalMesh};
use mesh_core::model::{tiny, ClientHead, Generation, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, Role};
use mesh_core::pipeline::{self, ClientLedger, RemoteSession, SessionConfig};
use mesh_core::BlockRange;

const PRICE: u64 = 3;

/// A billing mesh of `spans` on the tiny model, and a client peer with its own ledger,
/// once the servers cover every block.
struct Billed {
    dir: tempfile::TempDir,
    mesh: LocalMesh,
    head: ClientHead,
    client: p2p::Peer,
    ledger: ClientLedger,
}

async fn billed(spans: &[BlockRange]) -> Billed {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.path().join("ledgers"), PRICE));
    for span in spans {
        mesh.add_node(*span).await.unwrap();
    }
    let cfg = loopback_config(Role::Client, vec![mesh.bootstrap_addr().clone()]);
    let key = cfg.identity.signing_key();
    let client = p2p::spawn(cfg).await.unwrap();
    pipeline::wait_for_coverage(&client.client, mesh.model(), 8, Duration::from_secs(30))
        .await
        .unwrap();
    let ledger = ClientLedger {
        store: Store::open(&dir.path().join("client-ledger")).unwrap(),
        key,
        config_hash: ConfigHash::of(&files.config).unwrap(),
    };
    Billed {
        dir,
        mesh,
        head,
        client,
        ledger,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_and_the_client_hold_matching_countersigned_receipts() {
    let Billed {
        dir,
        mesh,
        head,
        client,
        ledger,
    } = billed(&BlockRange::even_split(8, 3)).await;
    let client_store = ledger.store.clone();
    let mut session = RemoteSession::open_billed(
        client.client.clone(),
        mesh.model().clone(),
        8,
        SessionConfig::default(),
        Some(ledger),
    )
    .await
    .unwrap();
    let prompt: Vec<u32> = vec![1, 66, 105, 108, 108, 32, 109, 101];
    let mut generation = Generation::new(prompt.clone(), SamplingParams::greedy(20), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    session.close().await;
    // Every generated token but the last went through every server once; the prompt once.
    let (prefill, decode) = (prompt.len() as u64, generation.generated().len() as u64 - 1);

    let check = |store: &Store, expect: usize| {
        let entries: Vec<_> = store.entries().map(|e| e.unwrap()).collect();
        assert_eq!(entries.len(), expect);
        for e in &entries {
            let r = e.countersigned.as_ref().expect("countersigned").clone();
            r.verify().unwrap();
            assert_eq!(
                (r.receipt.prefill_tokens, r.receipt.decode_tokens),
                (prefill, decode)
            );
            let blocks = u64::from(r.receipt.terms.span.len());
            assert_eq!(r.receipt.amount, (prefill + decode) * blocks * PRICE);
            assert_eq!(
                &e.latest, &r,
                "nothing billed beyond what was countersigned"
            );
        }
    };
    check(&client_store, 3);
    mesh.stop().await.unwrap();
    for i in 0..3 {
        let store = Store::open(&mesh_ledger(dir.path(), i)).unwrap();
        check(&store, 1);
    }
}

fn mesh_ledger(root: &std::path::Path, i: usize) -> std::path::PathBuf {
    root.join("ledgers").join(format!("node{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_session_keeps_a_valid_receipt_for_its_work() {
    let Billed {
        dir,
        mut mesh,
        head,
        client,
        ledger,
    } = billed(&[BlockRange::new(0, 8)]).await;
    let (victim, _) = mesh.servers()[0];
    let cfg = SessionConfig {
        step_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    };
    let mut session = RemoteSession::open_billed(
        client.client.clone(),
        mesh.model().clone(),
        8,
        cfg,
        Some(ledger),
    )
    .await
    .unwrap();
    let mut generation =
        Generation::new(vec![1, 72, 105], SamplingParams::greedy(40), 512).unwrap();
    let mut served = 0u64;
    while let Some((input, start)) = generation.next_input() {
        if generation.generated().len() == 20 {
            mesh.crash(victim);
        }
        let Ok(out) = session.step(head.embed(input).unwrap(), start as u32).await else {
            break;
        };
        served += input.len() as u64;
        generation.accept_logits(&head.last_logits(&out).unwrap());
    }
    assert_eq!(
        served,
        3 + 19,
        "the prompt and 19 decode steps ran before the crash"
    );
    mesh.stop().await.unwrap();

    // The crashed server's ledger as its files lie on disk (copied: in this process its
    // worker thread still holds the lock a real crash would release).
    let copy = dir.path().join("node0-after-crash");
    copy_dir(&dir.path().join("ledgers").join("node0"), &copy);
    let store = Store::open(&copy).unwrap();
    let entries: Vec<_> = store.entries().map(|e| e.unwrap()).collect();
    assert_eq!(entries.len(), 1);
    let latest = &entries[0].latest;
    latest.verify_server().unwrap();
    assert!(latest.receipt.tokens() >= 16 && latest.receipt.tokens() <= served);
    assert!(store.audit().is_ok());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
