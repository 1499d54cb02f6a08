//! One model served in three weight formats by three `mesh-node` processes: blocks 0..3
//! from a GGUF file (Q8_0), 3..6 from safetensors at f32, 6..8 from safetensors quantized
//! to q8_0 on load. A client that knows only the bootstrap sees each server's format and
//! gets exactly the tokens of a local run of the same three spans: every hop computes what
//! the local span computes (the same weights, the same kernels) and hidden states cross
//! the wire as f32, losslessly. A client wanting full precision finds no route.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;

use candle_core::{DType, Device};
use common::*;
use mesh_core::model::{
    tiny, write_gguf, ClientHead, Generation, ModelFiles, Quantization, SamplingParams, SpanModel,
};
use mesh_core::pipeline::{self, RemoteSession, SessionConfig};
use mesh_core::{BlockRange, ModelId};

const PROMPT: &[u32] = &[1, 84, 104, 101, 32, 109, 101, 115, 104, 32];
const NEW_TOKENS: usize = 16;

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy tokens through `spans` in this process.
fn local_greedy(head: &ClientHead, spans: &[SpanModel]) -> Vec<u32> {
    let mut caches: Vec<_> = spans.iter().map(|s| s.new_cache(64).unwrap()).collect();
    let (mut input, mut pos, mut out) = (PROMPT.to_vec(), 0, Vec::new());
    for _ in 0..NEW_TOKENS {
        let mut hidden = head.embed(&input).unwrap();
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            hidden = span.forward(cache, &hidden, pos).unwrap();
        }
        pos += input.len();
        let next = argmax(&head.last_logits(&hidden).unwrap());
        out.push(next);
        input = vec![next];
    }
    out
}

/// Three slices walked together.
fn zip3<'a, A, B, C: Copy>(
    a: &'a [A],
    b: &'a [B],
    c: [C; 3],
) -> impl Iterator<Item = (&'a A, &'a B, C)> {
    a.iter().zip(b).zip(c).map(|((a, b), c)| (a, b, c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_f32_and_q8_0_nodes_serve_one_model_together() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny::ensure(&dir.path().join("model")).unwrap();
    let st = ModelFiles::open(&model_dir).unwrap();
    let gguf = dir.path().join("tiny-q8_0.gguf");
    write_gguf(&st, Quantization::Q8_0, &gguf).unwrap();

    let (_boot, boot_addr) = start_bootstrap(dir.path()).await;
    let r = BlockRange::new;
    let plan: [(BlockRange, &std::path::Path, Option<&str>); 3] = [
        (r(0, 3), &gguf, None),
        (r(3, 6), &model_dir, None),
        (r(6, 8), &model_dir, Some("q8_0")),
    ];
    let mut nodes = Vec::new();
    for (i, (span, path, quantize)) in plan.iter().enumerate() {
        let name = format!("node{i}");
        let mut args = node_args(dir.path(), &name, *span, &[&boot_addr]);
        args.extend(["--model-dir".into(), path.display().to_string()]);
        if let Some(q) = quantize {
            args.extend(["--quantize".into(), q.to_string()]);
        }
        let node = Proc::spawn(&name, "mesh-node", &args, dir.path());
        let peer = Proc::peer_id(&node.listen_addr().await);
        nodes.push((peer, node));
    }

    // Each node says what it serves.
    for ((span, _, _), (_, node), want) in zip3(&plan, &nodes, [" (gguf:q8_0)", "", " (q8_0)"]) {
        let line = format!("serving {MODEL} blocks {span} of {NUM_BLOCKS}{want}");
        wait_for(DISCOVERY_LIMIT, &line, || {
            let found = node.has_line(|l| l == line);
            async move { found.then_some(()) }
        })
        .await;
    }
    let client = test_client(&boot_addr).await;
    let model = ModelId::new(MODEL);
    pipeline::wait_for_coverage(&client.client, &model, NUM_BLOCKS, DISCOVERY_LIMIT)
        .await
        .unwrap();
    // Each server's weights, as its DHT record announces them.
    for ((span, _, _), want) in plan.iter().zip(["gguf:q8_0", "", "q8_0"]) {
        let found = client.client.lookup(&model, span.start).await.unwrap();
        assert!(
            found
                .iter()
                .any(|s| s.span == *span && s.quantization == want),
            "{span}: {found:?}"
        );
    }
    // ...and as their heartbeats do.
    let c = client.client.clone();
    let heard = wait_for(DISCOVERY_LIMIT, "heartbeats of all three", || {
        let c = c.clone();
        let model = model.clone();
        async move {
            let live = c.live_servers(&model).await.ok()?;
            (live.len() == 3).then_some(live)
        }
    })
    .await;
    let mut labels: Vec<&str> = heard.iter().map(|s| s.quantization.as_str()).collect();
    labels.sort();
    assert_eq!(labels, ["", "gguf:q8_0", "q8_0"]);

    // The same three formats in this process.
    let head = ClientHead::load(&st, DType::F32, &Device::Cpu).unwrap();
    let g = ModelFiles::open(&gguf).unwrap();
    let cpu = &Device::Cpu;
    let spans = [
        SpanModel::load(&g, r(0, 3), DType::F32, cpu).unwrap(),
        SpanModel::load(&st, r(3, 6), DType::F32, cpu).unwrap(),
        SpanModel::load_quantized(&st, r(6, 8), DType::F32, Some(Quantization::Q8_0), cpu).unwrap(),
    ];
    let want = local_greedy(&head, &spans);
    let full = local_greedy(
        &head,
        &[SpanModel::load(&st, r(0, 8), DType::F32, cpu).unwrap()],
    );
    let same = want.iter().zip(&full).take_while(|(a, b)| a == b).count();
    eprintln!("mixed formats: {want:?}\nall f32:       {full:?} (first {same} equal)");

    let mut session = RemoteSession::open(
        client.client.clone(),
        model.clone(),
        NUM_BLOCKS,
        SessionConfig::default(),
    )
    .await
    .unwrap();
    let mut generation =
        Generation::new(PROMPT.to_vec(), SamplingParams::greedy(NEW_TOKENS), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    session.close().await;
    assert_eq!(generation.generated(), want.as_slice());

    // Full precision only: blocks 0..3 and 6..8 have no such server.
    let mut strict = SessionConfig::default();
    strict.policy.allow_quantized = false;
    strict.rediscover_for = std::time::Duration::from_secs(1);
    let refused = async {
        let mut session =
            RemoteSession::open(client.client.clone(), model.clone(), NUM_BLOCKS, strict).await?;
        let mut generation = Generation::new(PROMPT.to_vec(), SamplingParams::greedy(2), 512)?;
        pipeline::generate(&head, &mut session, &mut generation, |_| {}).await
    }
    .await;
    assert!(
        refused.is_err(),
        "a full-precision-only session found a route"
    );

    // A full-precision server of blocks 0..3 joins. Checking every step, a hop is only
    // ever compared with a server of its own format: the GGUF hop and the f32 one differ
    // honestly by far more than the tolerance, and neither may be taken for a liar.
    let mut args = node_args(dir.path(), "node3", r(0, 3), &[&boot_addr]);
    args.extend(["--model-dir".into(), model_dir.display().to_string()]);
    let node = Proc::spawn("node3", "mesh-node", &args, dir.path());
    nodes.push((Proc::peer_id(&node.listen_addr().await), node));
    let c = client.client.clone();
    wait_for(DISCOVERY_LIMIT, "heartbeats of all four", || {
        let c = c.clone();
        let model = model.clone();
        async move { (c.live_servers(&model).await.ok()?.len() == 4).then_some(()) }
    })
    .await;
    let mut checked = SessionConfig::default();
    checked.verify.rate = 1.0;
    for _ in 0..3 {
        let mut session = RemoteSession::open(
            client.client.clone(),
            model.clone(),
            NUM_BLOCKS,
            checked.clone(),
        )
        .await
        .unwrap();
        let mut generation =
            Generation::new(PROMPT.to_vec(), SamplingParams::greedy(4), 512).unwrap();
        pipeline::generate(&head, &mut session, &mut generation, |_| {})
            .await
            .unwrap();
        assert!(session.caught().is_empty(), "{:?}", session.caught());
        session.close().await;
    }
    for (_, node) in &mut nodes {
        node.kill();
    }
}
