//! CPU batch-1 decode against the memory-bandwidth floor, side by side in one run.
//!
//! For the tiny model's shape and for the 512-wide shape (`ModelShape::WIDE_512`: 8
//! blocks, vocab 32000, 167 MB of f32 weights per token), in f32, f16 and bf16, each path
//! a decode step can take: candle's generic matmul, and mesh's matrix-vector products
//! with each instruction set this CPU has. Each row: ms/token, the bandwidth achieved
//! (weights + KV read per token over the time) and the ratio to two floors (those bytes
//! over this machine's memory bandwidth with one thread per core, the better of copying
//! and reading: measured around the row, and the best of the run; see `Bandwidth`).
//!
//! Then the 512-wide f32 model through a 3-node mesh on loopback against one process,
//! and, where `MESH_BENCH_PYTHON` names a Python with torch and transformers,
//! transformers on the same weights (`scripts/time_transformers.py`).
//!
//! Run: `cargo bench --bench cpu_decode` (`TOKENS=n` steps per row, default 64; `ONLY=`
//! a substring of "shape dtype path" to time only those rows, for profiling; the mesh
//! row comes with "512-wide F32 avx512", or whichever ISA is this CPU's best).

use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use mesh::decode_timing::{argmax, time_decode, write_model_dir, DecodeTiming, ModelShape};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::matvec::{self, Isa};
use mesh_core::model::{ClientHead, ModelFiles, Quantization};
use mesh_core::pipeline::{RemoteSession, SessionConfig};
use mesh_core::BlockRange;

const CONTEXT: usize = 16;

const TINY: ModelShape = ModelShape {
    name: "tiny",
    hidden: 128,
    intermediate: 344,
    layers: 8,
    heads: 8,
    kv_heads: 2,
    vocab: 259,
};

fn main() -> anyhow::Result<()> {
    let tokens: usize = std::env::var("TOKENS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(64);
    let threads = matvec::pool().threads();
    let mut bandwidth = Bandwidth::default();
    let mut rows = Vec::new();
    let mut one_process_ms = None;
    for shape in [TINY, ModelShape::WIDE_512] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut paths: Vec<Option<Isa>> = vec![None];
            paths.extend(Isa::available().into_iter().rev().map(Some));
            for path in paths {
                matvec::set_enabled(path.is_some());
                if let Some(isa) = path {
                    matvec::set_isa(isa);
                }
                let name = path.map_or("candle matmul", Isa::name);
                if !selected(&format!("{} {dtype:?} {name}", shape.name)) {
                    continue;
                }
                let timing = time_decode(shape, &Device::Cpu, dtype, CONTEXT, tokens, false, None);
                let label = format!("| {} | {dtype:?} | {name} |", shape.name);
                match timing {
                    Ok(t) => {
                        bandwidth.achieved(&t);
                        rows.push((label, Ok(t)));
                        let best = path == Some(Isa::detect());
                        if best && dtype == DType::F32 && shape.name == ModelShape::WIDE_512.name {
                            one_process_ms = Some(t.ms_per_token);
                        }
                    }
                    Err(e) => rows.push((label, Err(e))),
                }
            }
        }
    }
    matvec::set_enabled(true);
    matvec::set_isa(Isa::detect());
    // Quantized projections (QMatMul), f32 activations; the LM head stays f32.
    for q in [Quantization::Q8_0, Quantization::Q4K] {
        for on in [false, true] {
            matvec::set_enabled(on);
            let shape = ModelShape::WIDE_512;
            let path = if on { "cpu step" } else { "candle ops" };
            if !selected(&format!("{} F32, {q} blocks {path}", shape.name)) {
                continue;
            }
            let t = time_decode(
                shape,
                &Device::Cpu,
                DType::F32,
                CONTEXT,
                tokens,
                false,
                Some(q),
            )?;
            bandwidth.achieved(&t);
            rows.push((
                format!("| {} | F32, {q} blocks | {path} |", shape.name),
                Ok(t),
            ));
        }
    }
    matvec::set_enabled(true);
    println!(
        "memory bandwidth: {:.1} GB/s, the best of the run ({threads} threads; measured \
         {:.1}-{:.1} GB/s copying or reading around each row's steps). Best ISA: {}\n",
        bandwidth.best / 1e9,
        bandwidth.worst / 1e9,
        bandwidth.measured / 1e9,
        Isa::detect().name()
    );
    println!(
        "| shape | dtype | path | ms/token | GB/s (memory's around it) | × floor around the row | × floor, run's best | floor ms, run's best |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, timing) in rows {
        match timing {
            Ok(t) => {
                let around = t.bandwidth_around.unwrap_or(0.0).max(t.gb_per_s() * 1e9);
                let floor_ms = t.bytes_per_token / bandwidth.best * 1e3;
                println!(
                    "{label} {:.3} | {:.1} ({:.1}) | {:.2} | {:.2} | {floor_ms:.3} |",
                    t.ms_per_token,
                    t.gb_per_s(),
                    around / 1e9,
                    t.ms_per_token / (t.bytes_per_token / around * 1e3),
                    t.ms_per_token / floor_ms,
                );
            }
            Err(e) => println!("{label} failed: {e} | | | | |"),
        }
    }

    // The mesh row goes with the one-process row it is compared with.
    let best = format!("512-wide F32 {}", Isa::detect().name());
    if !selected(&best) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    write_model_dir(ModelShape::WIDE_512, DType::F32, 4096, dir.path())?;
    let mesh_ms = mesh_decode(dir.path(), tokens)?;
    println!("\n| 512-wide f32 | ms/token | vs one process |\n|---|---|---|");
    if let Some(one) = one_process_ms {
        println!(
            "| one process ({}) | {one:.2} | 1.00x |",
            Isa::detect().name()
        );
        println!(
            "| 3 nodes, loopback | {mesh_ms:.2} | {:.2}x |",
            mesh_ms / one
        );
    }
    if let Ok(python) = std::env::var("MESH_BENCH_PYTHON") {
        for (dtype, torch) in [(DType::F32, "float32"), (DType::BF16, "bfloat16")] {
            let dir = tempfile::tempdir()?;
            write_model_dir(ModelShape::WIDE_512, dtype, 4096, dir.path())?;
            let out = Command::new(&python)
                .arg("scripts/time_transformers.py")
                .arg(dir.path())
                .args([
                    "--tokens",
                    &tokens.to_string(),
                    "--context",
                    &CONTEXT.to_string(),
                ])
                .args(["--threads", &threads.to_string(), "--dtype", torch])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            match text
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
            {
                Some(ms) => println!(
                    "| transformers {torch} ({}) | {ms:.2} | {} |",
                    text.split_whitespace()
                        .skip(2)
                        .collect::<Vec<_>>()
                        .join(" "),
                    one_process_ms.map_or(String::new(), |one| format!("{:.2}x", ms / one)),
                ),
                None => println!(
                    "| transformers {torch} | failed: {} | |",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
            }
        }
    }
    Ok(())
}

fn selected(row: &str) -> bool {
    std::env::var("ONLY").map_or(true, |only| row.contains(&only))
}

/// This machine's memory bandwidth, which swings by up to 1.7x with its neighbours' load
/// (and with where the kernel placed the pages): measured just before and after each
/// row's timed steps (`DecodeTiming::bandwidth_around`). Each row is held
/// to two floors: the better bandwidth of the two around its steps (or its own pace, if
/// faster), which is what memory gave while it ran, and the best of the whole run, raised
/// to any row's pace, so that no row looks near its floor because memory was slow when
/// the floor was taken.
#[derive(Default)]
struct Bandwidth {
    best: f64,
    measured: f64,
    worst: f64,
}

impl Bandwidth {
    /// A row's pace, and the bandwidths measured around it, count for the run's best.
    fn achieved(&mut self, t: &DecodeTiming) {
        if let Some(now) = t.bandwidth_around {
            self.measured = self.measured.max(now);
            self.worst = if self.worst == 0.0 {
                now
            } else {
                self.worst.min(now)
            };
            self.best = self.best.max(now);
        }
        self.best = self.best.max(t.gb_per_s() * 1e9);
    }
}

/// ms per token of greedy decode through a 3-node loopback mesh (real swarms, TCP, noise,
/// yamux), the head in this process, as `time_decode` times one process.
fn mesh_decode(dir: &std::path::Path, tokens: usize) -> anyhow::Result<f64> {
    let files = ModelFiles::open(dir)?;
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu)?;
    let blocks = files.config.num_blocks();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mesh = LocalMesh::start(dir, &BlockRange::even_split(blocks, 3)).await?;
        // Time the steady state: servers that dialed each other at once push by
        // request-response until one of the two connections is closed.
        if !mesh.settle(Duration::from_secs(30)).await {
            eprintln!("warning: the mesh's servers still hold two connections to a peer");
        }
        let client = mesh.client().await?;
        let mut session = RemoteSession::open_with(
            client.client.clone(),
            mesh.model().clone(),
            blocks,
            SessionConfig {
                max_len: (CONTEXT + 2 + tokens) as u32,
                ..SessionConfig::default()
            },
            Default::default(),
        )
        .await?;
        let prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| 1 + i % 250).collect();
        let hidden = session.step(head.embed(&prompt)?, 0).await?;
        let mut next = argmax(&head.last_logits(&hidden)?);
        // Two warm-up steps, as `time_decode` takes, then the timed ones.
        let mut started = Instant::now();
        for (i, pos) in (CONTEXT as u32..).take(tokens + 2).enumerate() {
            if i == 2 {
                started = Instant::now();
            }
            let hidden = session.step(head.embed(&[next])?, pos).await?;
            next = argmax(&head.last_logits(&hidden)?);
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / tokens as f64;
        session.close().await;
        mesh.stop().await?;
        Ok(ms)
    })
}
