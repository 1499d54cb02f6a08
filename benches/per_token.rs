//! Per-token decode latency of the embedded tiny model, side by side in one run:
//!
//! - `span/*`: one server's work, a span of 1, 3 and 8 blocks, one position per step;
//! - `span-format/{f32,q8_0,q4k}`: a 2-block span of a wider random model (hidden 1024,
//!   intermediate 2816, every matrix a whole number of Q4_K blocks) with its weights at
//!   f32 and quantized on load to q8_0 and q4k, one position per step;
//! - `whole/local`: embeddings, all 8 blocks and the LM head in one process;
//! - `whole/mesh-3`: the same through a 3-server mesh on loopback (real swarms, TCP,
//!   noise, yamux, wire frames), as a client sees it, servers pushing each step's output
//!   to the next; `whole/mesh-3-relayed`: the same with every output back through the
//!   client (`SessionConfig::push` off); `whole/mesh-3-exchange` and
//!   `whole/mesh-3-relayed-exchange`: both again on a second mesh whose peers ask by
//!   request-response instead of on session streams (`P2pConfig::session_streams` off);
//! - `whole/mesh-3-verify-{10,50,100}pct-local`, `whole/mesh-3-verify-{10,50,100}pct-witness`:
//!   the same with that fraction of each hop's steps re-checked, against the client's own
//!   weights or against a second server of the span (the mesh has two servers per span).
//! - `hop/*`: what one hop of a step costs, apart: `encode` (the step and its answer
//!   through the wire format and back), `transport` (a request and its answer between two
//!   real swarms on loopback, answered at once by the server's event handler: no worker,
//!   no model) by request-response and `transport-stream` on a session stream, and
//!   `mesh-1` (the whole model as one server's span, as a client sees it: the same as
//!   `whole/local` plus one hop), on streams, and `mesh-1-exchange` by request-response.
//!   `mesh-1` − `whole/local` is one hop's overhead;
//!   what `encode` and `transport` do not explain of it is the worker hand-off and the
//!   session's bookkeeping on both sides.
//!
//! Run: `cargo bench --bench per_token`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, ClientHead, LlamaConfig, ModelFiles, Quantization, SpanModel};
use mesh_core::p2p::{self, Announcement, Event, Role};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{
    LocalReference, RemoteSession, SessionConfig, SessionRequest, SessionResponse, VerifyConfig,
};
use mesh_core::types::{ServerLoad, SessionId};
use mesh_core::wire::{self, WireTensor};
use mesh_core::{BlockRange, ModelId};

/// Decode positions per session before it is restarted (the cache is preallocated).
const SESSION_LEN: usize = 256;

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    tiny::write(dir.path()).expect("tiny model");
    dir
}

fn span_decode(c: &mut Criterion) {
    let dir = model_dir();
    let files = ModelFiles::open(dir.path()).expect("model");
    let mut group = c.benchmark_group("span");
    for blocks in [1u32, 3, 8] {
        let span = SpanModel::load(&files, BlockRange::new(0, blocks), DType::F32, &Device::Cpu)
            .expect("span");
        let x = Tensor::randn(0f32, 1.0, (1, 1, 128), &Device::Cpu).expect("input");
        group.bench_function(format!("{blocks}-blocks"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut cache = span.new_cache(SESSION_LEN).expect("cache");
                for _ in 0..iters {
                    if cache.len() == SESSION_LEN {
                        cache.reset();
                    }
                    let start = Instant::now();
                    let pos = cache.len();
                    span.forward(&mut cache, &x, pos).expect("forward");
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

/// One decode step per iteration through `span`, restarting the session when full.
fn decode_steps(span: &SpanModel, x: &Tensor, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut cache = span.new_cache(SESSION_LEN).expect("cache");
    for _ in 0..iters {
        if cache.len() == SESSION_LEN {
            cache.reset();
        }
        let start = Instant::now();
        let pos = cache.len();
        span.forward(&mut cache, x, pos).expect("forward");
        total += start.elapsed();
    }
    total
}

fn span_formats(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 259, "hidden_size": 1024, "intermediate_size": 2816,
            "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5}"#,
    )
    .expect("config");
    tiny::write_random(dir.path(), &cfg).expect("random model");
    let files = ModelFiles::open(dir.path()).expect("model");
    let x = Tensor::randn(0f32, 1.0, (1, 1, 1024), &Device::Cpu).expect("input");
    let mut group = c.benchmark_group("span-format");
    for quant in [None, Some(Quantization::Q8_0), Some(Quantization::Q4K)] {
        let span = SpanModel::load_quantized(
            &files,
            BlockRange::new(0, 2),
            DType::F32,
            quant,
            &Device::Cpu,
        )
        .expect("span");
        let name = quant.map_or("f32", |q| q.name());
        eprintln!("span-format/{name}: {} weight bytes", span.weight_bytes());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| decode_steps(&span, &x, iters))
        });
    }
    group.finish();
}

fn whole_model(c: &mut Criterion) {
    let dir = model_dir();
    let files = ModelFiles::open(dir.path()).expect("model");
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).expect("head");
    let span =
        SpanModel::load(&files, BlockRange::new(0, 8), DType::F32, &Device::Cpu).expect("span");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Two servers per span (routes still take 3 hops): the second answers checks.
    let split = BlockRange::even_split(8, 3);
    let spans = [split.clone(), split].concat();
    let mesh = rt
        .block_on(LocalMesh::start(dir.path(), &spans))
        .expect("mesh");
    rt.block_on(settle(&mesh));
    let client = rt.block_on(mesh.client()).expect("client");

    let mut group = c.benchmark_group("whole");
    group.bench_function("local", |b| {
        b.iter_custom(|iters| {
            let mut cache = span.new_cache(SESSION_LEN).expect("cache");
            let start = Instant::now();
            for _ in 0..iters {
                if cache.len() == SESSION_LEN {
                    cache.reset();
                }
                let pos = cache.len();
                let h = head.embed(&[65]).expect("embed");
                let h = span.forward(&mut cache, &h, pos).expect("forward");
                head.last_logits(&h).expect("logits");
            }
            start.elapsed()
        })
    });
    let steps = |cfg: SessionConfig, ctx: SessionContext, iters: u64| {
        mesh_steps(&rt, &client, &mesh, &head, cfg, ctx, iters)
    };
    group.bench_function("mesh-3", |b| {
        b.iter_custom(|iters| steps(SessionConfig::default(), SessionContext::default(), iters))
    });
    rt.block_on(report_pushes(&mesh));
    let relayed = SessionConfig {
        push: false,
        ..SessionConfig::default()
    };
    group.bench_function("mesh-3-relayed", |b| {
        b.iter_custom(|iters| steps(relayed.clone(), SessionContext::default(), iters))
    });
    // The same mesh with every peer asking by request-response, not on session streams.
    let exchange = rt
        .block_on(LocalMesh::start_without_streams(dir.path(), &spans))
        .expect("mesh");
    rt.block_on(settle(&exchange));
    let exchange_client = rt.block_on(exchange.client()).expect("client");
    for (name, cfg) in [
        ("mesh-3-exchange", SessionConfig::default()),
        ("mesh-3-relayed-exchange", relayed.clone()),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let ctx = SessionContext::default();
                mesh_steps(
                    &rt,
                    &exchange_client,
                    &exchange,
                    &head,
                    cfg.clone(),
                    ctx,
                    iters,
                )
            })
        });
    }
    rt.block_on(exchange.stop()).expect("stop");
    let verifying = |rate| SessionConfig {
        verify: VerifyConfig {
            rate,
            ..VerifyConfig::default()
        },
        ..SessionConfig::default()
    };
    let local = SessionContext {
        reference: Some(Arc::new(Mutex::new(LocalReference::new(
            dir.path().to_path_buf(),
        )))),
        ..SessionContext::default()
    };
    for pct in [10, 50, 100] {
        let cfg = verifying(f64::from(pct) / 100.0);
        group.bench_function(format!("mesh-3-verify-{pct}pct-local"), |b| {
            b.iter_custom(|iters| steps(cfg.clone(), local.clone(), iters))
        });
    }
    for pct in [10, 50, 100] {
        let cfg = verifying(f64::from(pct) / 100.0);
        group.bench_function(format!("mesh-3-verify-{pct}pct-witness"), |b| {
            b.iter_custom(|iters| steps(cfg.clone(), SessionContext::default(), iters))
        });
    }
    group.finish();
    rt.block_on(mesh.stop()).expect("stop");
}

/// A decode step's request and answer for the tiny model (hidden 128), as on the wire.
fn step_messages() -> (SessionRequest, SessionResponse) {
    let x = Tensor::randn(0f32, 1.0, (1, 1, 128), &Device::Cpu).expect("input");
    let hidden = WireTensor::from_tensor(&x).expect("wire tensor");
    let session = SessionId::random();
    let request = SessionRequest::Forward {
        session,
        start_pos: 7,
        hidden: hidden.clone(),
    };
    let response = SessionResponse::Hidden {
        session,
        hidden,
        compute_micros: 100,
        receipt: None,
        attestation: None,
    };
    (request, response)
}

fn hop_costs(c: &mut Criterion) {
    let dir = model_dir();
    let files = ModelFiles::open(dir.path()).expect("model");
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).expect("head");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("hop");

    let (request, response) = step_messages();
    group.bench_function("encode", |b| {
        b.iter(|| {
            let bytes = wire::encode(&request).expect("encode");
            let _: SessionRequest = wire::decode(&bytes, wire::FRAME_LIMIT).expect("decode");
            let bytes = wire::encode(&response).expect("encode");
            let _: SessionResponse = wire::decode(&bytes, wire::FRAME_LIMIT).expect("decode");
        })
    });

    // Two swarms; the server answers every request at once with a step's answer. One
    // requester asks by request-response, the other on a session stream.
    let answer = wire::encode(&response).expect("encode");
    let asked = wire::encode(&request).expect("encode");
    let (server_id, exchange, streamed, stop) = rt.block_on(async {
        let server = p2p::spawn(p2p_loopback(Role::Server))
            .await
            .expect("server");
        let server_id = server.client.local_peer_id();
        let addrs = server.client.listen_addrs().await.expect("addrs");
        let requester = |session_streams| async move {
            p2p::spawn(p2p::P2pConfig {
                session_streams,
                ..p2p_loopback(Role::Client)
            })
            .await
            .expect("client")
        };
        let (exchange, streamed) = (requester(false).await, requester(true).await);
        let ann = Announcement {
            model: ModelId::new(tiny::TINY_MODEL_ID),
            span: BlockRange::new(0, 8),
            num_blocks: 8,
            price_per_token: 0,
            load: ServerLoad::default(),
            capability: Default::default(),
            quantization: String::new(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(p2p::serve(
            server,
            ann,
            async {
                let _ = stopped.await;
            },
            move |client, event| {
                if let Event::InboundRequest { channel, .. } = event {
                    let (client, answer) = (client.clone(), answer.clone());
                    tokio::spawn(async move {
                        let _ = client.respond(channel, answer).await;
                    });
                }
            },
        ));
        let addr = addrs[0].clone().with(p2p::Protocol::P2p(server_id));
        exchange.client.dial(addr.clone()).await.expect("dial");
        streamed.client.dial(addr).await.expect("dial");
        (server_id, exchange, streamed, stop)
    });
    // Whether a filter let `transport-stream` run: only then must requests be on the stream.
    let stream_ran = std::sync::atomic::AtomicBool::new(false);
    for (name, requester) in [("transport", &exchange), ("transport-stream", &streamed)] {
        group.bench_function(name, |b| {
            if name == "transport-stream" {
                stream_ran.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            b.iter(|| {
                rt.block_on(requester.client.request(server_id, asked.clone()))
                    .expect("answer")
            })
        });
    }
    let stats = rt.block_on(streamed.client.stats()).expect("stats").streams;
    assert!(
        stats.requests > 0 || !stream_ran.into_inner(),
        "no request went on the stream: {stats:?}"
    );
    let _ = stop.send(());

    let whole = [BlockRange::new(0, 8)];
    let streamed = rt
        .block_on(LocalMesh::start(dir.path(), &whole))
        .expect("mesh");
    let exchange = rt
        .block_on(LocalMesh::start_without_streams(dir.path(), &whole))
        .expect("mesh");
    rt.block_on(settle(&streamed));
    rt.block_on(settle(&exchange));
    for (name, mesh) in [("mesh-1", &streamed), ("mesh-1-exchange", &exchange)] {
        let mesh_client = rt.block_on(mesh.client()).expect("client");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (cfg, ctx) = (SessionConfig::default(), SessionContext::default());
                mesh_steps(&rt, &mesh_client, mesh, &head, cfg, ctx, iters)
            })
        });
    }
    group.finish();
    rt.block_on(streamed.stop()).expect("stop");
    rt.block_on(exchange.stop()).expect("stop");
}

/// `iters` decode steps of one position through `mesh` as `client` sees them (embedding
/// and LM head included), in sessions of at most [`SESSION_LEN`] steps.
fn mesh_steps(
    rt: &tokio::runtime::Runtime,
    client: &p2p::Peer,
    mesh: &LocalMesh,
    head: &ClientHead,
    cfg: SessionConfig,
    ctx: SessionContext,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            let mut session = RemoteSession::open_with(
                client.client.clone(),
                mesh.model().clone(),
                8,
                cfg.clone(),
                ctx.clone(),
            )
            .await
            .expect("session");
            let steps = (iters - done).min(SESSION_LEN as u64);
            let start = Instant::now();
            for pos in 0..steps {
                let h = head.embed(&[65]).expect("embed");
                let h = session.step(h, pos as u32).await.expect("step");
                head.last_logits(&h).expect("logits");
            }
            total += start.elapsed();
            done += steps;
            session.close().await;
        }
        total
    })
}

/// Waits until the mesh's servers hold one connection per peer, so that what is timed is
/// the steady state, not the seconds after start-up when two servers that dialed each
/// other at once still push by request-response ([`LocalMesh::settle`]).
async fn settle(mesh: &LocalMesh) {
    if !mesh.settle(Duration::from_secs(30)).await {
        eprintln!("warning: the mesh's servers still hold two connections to a peer");
    }
}

/// Prints how the mesh's servers sent their pushes so far: on session streams, or by
/// request-response because no stream could be had.
async fn report_pushes(mesh: &LocalMesh) {
    let (mut streamed, mut fell_back) = (0, 0);
    for (peer, _) in mesh.servers() {
        let Some(node) = mesh.node(peer) else {
            continue;
        };
        if let Ok(stats) = node.client().stats().await {
            streamed += stats.streams.notices;
            fell_back += stats.streams.fell_back;
        }
    }
    eprintln!("pushes between servers: {streamed} on streams, {fell_back} by request-response");
}

/// A swarm's settings on loopback with no bootstrap.
fn p2p_loopback(role: Role) -> p2p::P2pConfig {
    mesh_core::local_mesh::loopback_config(role, Vec::new())
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = span_decode, span_formats, whole_model, hop_costs
}
criterion_main!(benches);
