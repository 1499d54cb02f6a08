//! Per-token decode latency of the embedded tiny model, side by side in one run:
//!
//! - `span/*`: one server's work, a span of 1, 3 and 8 blocks, one position per step;
//! - `span-format/{f32,q8_0,q4k}`: a 2-block span of a wider random model (hidden 1024,
//!   intermediate 2816, every matrix a whole number of Q4_K blocks) with its weights at
//!   f32 and quantized on load to q8_0 and q4k, one position per step;
//! - `whole/local`: embeddings, all 8 blocks and the LM head in one process;
//! - `whole/mesh-3`: the same through a 3-server mesh on loopback (real swarms, TCP,
//!   noise, yamux, wire frames), as a client sees it;
//! - `whole/mesh-3-verify-{10,50,100}pct-local`, `whole/mesh-3-verify-{10,50,100}pct-witness`:
//!   the same with that fraction of each hop's steps re-checked, against the client's own
//!   weights or against a second server of the span (the mesh has two servers per span).
//!
//! Run: `cargo bench --bench per_token`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, ClientHead, LlamaConfig, ModelFiles, Quantization, SpanModel};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{LocalReference, RemoteSession, SessionConfig, VerifyConfig};
use mesh_core::BlockRange;

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
    let mesh = rt
        .block_on(LocalMesh::start(
            dir.path(),
            &[split.clone(), split].concat(),
        ))
        .expect("mesh");
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
    let mesh_steps = |cfg: SessionConfig, ctx: SessionContext, iters: u64| {
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
    };
    group.bench_function("mesh-3", |b| {
        b.iter_custom(|iters| {
            mesh_steps(SessionConfig::default(), SessionContext::default(), iters)
        })
    });
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
            b.iter_custom(|iters| mesh_steps(cfg.clone(), local.clone(), iters))
        });
    }
    for pct in [10, 50, 100] {
        let cfg = verifying(f64::from(pct) / 100.0);
        group.bench_function(format!("mesh-3-verify-{pct}pct-witness"), |b| {
            b.iter_custom(|iters| mesh_steps(cfg.clone(), SessionContext::default(), iters))
        });
    }
    group.finish();
    rt.block_on(mesh.stop()).expect("stop");
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = span_decode, span_formats, whole_model
}
criterion_main!(benches);
