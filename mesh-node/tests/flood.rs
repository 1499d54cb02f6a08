//! A flood against a real `mesh-node` process: one peer opens sessions and sends prefill
//! frames, garbage and oversized frames as fast as it can, from many tasks at once, while
//! an honest client generates through the same node. The honest generations must come
//! out right, the flooder must be refused, and the node's resident memory must stay
//! within its configured cache budget (plus its weights and fixed buffers).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::*;
use mesh_core::model::{tiny, ClientHead, Generation, LocalModel, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, PeerId};
use mesh_core::pipeline::{self, RemoteSession, SessionConfig, SessionRequest, SessionResponse};
use mesh_core::wire::{self, WireTensor};
use mesh_core::{BlockRange, ModelId, SessionId};

const PROMPT: &[u32] = &[1, 70, 108, 111, 111, 100];
const CACHE_BUDGET_MIB: u64 = 64;
const MAX_LEN: u32 = 512;
const FLOOD_TASKS: usize = 48;
const FLOOD_FOR: Duration = Duration::from_secs(8);

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 12,
        temperature: 0.8,
        seed: 99,
        ..SamplingParams::default()
    }
}

/// Resident and peak resident memory of `pid`, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One flooding task: open sessions and fill them with 256-position prefills, mixed with
/// undecodable and oversized frames, until `stop`. Counts every answer by kind.
async fn flood(
    p2p: p2p::Client,
    target: PeerId,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
) {
    let hidden = Tensor::randn(0f32, 1.0, (1, 256, 128), &Device::Cpu).unwrap();
    let prefill = WireTensor::from_tensor(&hidden).unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let session = SessionId::random();
        let open = SessionRequest::Open {
            session,
            model: ModelId::new(MODEL),
            span: BlockRange::new(0, NUM_BLOCKS),
            max_len: MAX_LEN,
            attest: true,
        };
        let forward = SessionRequest::Forward {
            session,
            start_pos: 0,
            hidden: prefill.clone(),
        };
        let mut frames = vec![
            wire::encode(&open).unwrap(),
            wire::encode(&forward).unwrap(),
        ];
        if n.is_multiple_of(4) {
            frames.push(vec![0xff; 1000]);
        }
        if n.is_multiple_of(8) {
            frames.push(vec![0u8; 2 << 20]);
        }
        for frame in frames {
            let kind = match p2p.request(target, frame).await {
                Ok(bytes) => match wire::decode::<SessionResponse>(&bytes, wire::FRAME_LIMIT) {
                    Ok(SessionResponse::Refused(r)) => mesh_core::metrics::refusal_kind(&r).into(),
                    Ok(SessionResponse::Opened { .. }) => "opened".into(),
                    Ok(SessionResponse::Hidden { .. }) => "hidden".into(),
                    Ok(_) => "other".into(),
                    Err(_) => "undecodable answer".into(),
                },
                Err(_) => "stream failed".to_string(),
            };
            *seen.lock().unwrap().entry(kind).or_default() += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_refused_while_honest_clients_finish_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let (_boot, boot_addr) = start_bootstrap(dir.path()).await;
    let mut args = node_args(
        dir.path(),
        "node",
        BlockRange::new(0, NUM_BLOCKS),
        &[&boot_addr],
    );
    for extra in [
        "--model-dir",
        &model_dir.display().to_string(),
        "--cache-budget-mib",
        &CACHE_BUDGET_MIB.to_string(),
        "--max-len",
        &MAX_LEN.to_string(),
    ] {
        args.push(extra.into());
    }
    let node = Proc::spawn("node", "mesh-node", &args, dir.path());
    let target = Proc::peer_id(&node.listen_addr().await);
    let pid: u32 = std::fs::read_to_string(dir.path().join("node.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let want = LocalModel::load_split(&model_dir, 1, &Device::Cpu)
        .unwrap()
        .generate_ids(PROMPT.to_vec(), &params(), |_| {})
        .unwrap()
        .generated()
        .to_vec();
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let honest = test_client(&boot_addr).await;
    let model = ModelId::new(MODEL);
    pipeline::wait_for_coverage(&honest.client, &model, NUM_BLOCKS, DISCOVERY_LIMIT)
        .await
        .unwrap();
    let generate = |p2p: p2p::Client| {
        let (head, model) = (&head, model.clone());
        async move {
            let cfg = SessionConfig {
                max_len: 64,
                step_timeout: Duration::from_secs(10),
                ..SessionConfig::default()
            };
            let mut session = RemoteSession::open(p2p, model, NUM_BLOCKS, cfg).await?;
            let mut g = Generation::new(PROMPT.to_vec(), params(), 512)?;
            pipeline::generate(head, &mut session, &mut g, |_| {}).await?;
            session.close().await;
            Ok::<_, mesh_core::pipeline::PipelineError>(g.generated().to_vec())
        }
    };
    // Warm up, then take the baseline (memory, and the time of a generation alone).
    assert_eq!(generate(honest.client.clone()).await.unwrap(), want);
    let t = Instant::now();
    assert_eq!(generate(honest.client.clone()).await.unwrap(), want);
    let alone = t.elapsed();
    let (baseline, _) = memory_kib(pid);

    let flooder = test_client(&boot_addr).await;
    flooder.client.discover(&model, NUM_BLOCKS).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let tasks: Vec<_> = (0..FLOOD_TASKS)
        .map(|_| {
            tokio::spawn(flood(
                flooder.client.clone(),
                target,
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(memory_kib(pid).0);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };

    // Honest generations while the flood runs.
    let started = Instant::now();
    let mut honest_runs = 0;
    let mut honest_time = Duration::ZERO;
    while started.elapsed() < FLOOD_FOR {
        let t = Instant::now();
        let got = generate(honest.client.clone()).await.unwrap();
        assert_eq!(got, want, "an honest generation went wrong under the flood");
        honest_time += t.elapsed();
        honest_runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let peak_rss = sampler.await.unwrap();
    let (_, hwm) = memory_kib(pid);
    let seen = seen.lock().unwrap().clone();
    let total: u64 = seen.values().sum();
    println!(
        "flood: {total} requests from one peer in {:.1} s: {seen:?}",
        FLOOD_FOR.as_secs_f64()
    );
    println!(
        "honest: {honest_runs} generations of {} tokens, {:.0} ms each on average under the flood, {:.0} ms alone",
        want.len(),
        honest_time.as_secs_f64() * 1e3 / honest_runs as f64,
        alone.as_secs_f64() * 1e3
    );
    println!(
        "node memory: baseline {} MiB, peak RSS during the flood {} MiB, VmHWM {} MiB, cache budget {CACHE_BUDGET_MIB} MiB",
        baseline / 1024,
        peak_rss / 1024,
        hwm / 1024
    );

    assert!(
        honest_runs >= 2,
        "honest clients were starved: {honest_runs} runs"
    );
    let refused: u64 = [
        "too_many_client_sessions",
        "rate_limited",
        "busy",
        "over_budget",
    ]
    .iter()
    .filter_map(|k| seen.get(*k))
    .sum();
    assert!(refused > 0, "the flooder was never refused: {seen:?}");
    assert!(
        seen.get("stream failed").copied().unwrap_or(0) > 0,
        "oversized frames must be cut off: {seen:?}"
    );
    // Growth over the baseline stays within the KV-cache budget, with 64 MiB for buffers
    // (frames in flight are bounded by the per-peer limits and the frame limit).
    assert!(
        peak_rss <= baseline + (CACHE_BUDGET_MIB + 64) * 1024,
        "node grew from {baseline} KiB to {peak_rss} KiB"
    );
    drop(node);
}
