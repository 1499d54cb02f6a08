//! Prints the GPU check's table (see `mesh::gpu_check`); run by `scripts/gpu-check.sh`.
//! Exits 1 when a check fails, 2 when the GPU cannot be used at all.

use std::path::PathBuf;

use clap::Parser;
use mesh::gpu_check::{self, Row};
use mesh_core::model::{parse_dtype, DeviceSpec};

#[derive(Parser)]
#[command(about = "Check mesh's GPU path: kernels, fixtures, a 3-node mesh, decode speed")]
struct Args {
    /// The GPU to check.
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    /// The transformers fixtures (config, weights and expected.safetensors per model).
    #[arg(long, default_value = "mesh-core/tests/fixtures")]
    fixtures: PathBuf,
    /// Decode steps timed per model shape.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Dtype of the decode timings.
    #[arg(long, default_value = "bf16", value_parser = |s: &str| parse_dtype(s).ok_or(format!("{s:?}: f32, f16 or bf16")))]
    dtype: candle_core::DType,
    /// Skip the decode timings (the large random-weight models).
    #[arg(long)]
    skip_decode: bool,
    /// Also write the table here (Markdown).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the sections on the CPU when no GPU can be used (to test this harness).
    #[arg(long)]
    allow_cpu: bool,
    /// Scratch space for the tiny model.
    #[arg(long, default_value = "/tmp/mesh-gpu-check")]
    work_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let selected = mesh_core::model::device::select(args.device);
    println!("device: {}", selected.description);
    if selected.fell_back && !args.allow_cpu {
        eprintln!("no GPU to check: {}", selected.description);
        std::process::exit(2);
    }
    let device = selected.device;
    let mut rows: Vec<Row> = Vec::new();
    let mut section = |name: &str, result: anyhow::Result<Vec<Row>>| match result {
        Ok(r) => {
            println!("{}", gpu_check::render(&r));
            rows.extend(r);
        }
        Err(e) => {
            println!("section {name} failed: {e:#}");
            rows.push(Row {
                section: "error",
                item: name.to_string(),
                value: format!("{e:#}").replace('|', "/"),
                target: "runs".into(),
                ok: Some(false),
            });
        }
    };
    section("kernels", gpu_check::kernels(&device));
    section("fixtures", gpu_check::fixtures(&device, &args.fixtures));
    section("mesh", gpu_check::mesh(args.device, &args.work_dir).await);
    if !args.skip_decode {
        section(
            "decode",
            gpu_check::decode(&device, args.dtype, args.tokens),
        );
    }
    let table = gpu_check::render(&rows);
    println!("\n## GPU check: {}\n\n{table}", selected.description);
    if let Some(out) = &args.out {
        std::fs::write(out, format!("device: {}\n\n{table}", selected.description))?;
    }
    let failed = rows.iter().filter(|r| r.ok == Some(false)).count();
    println!("{failed} checks failed");
    std::process::exit(i32::from(failed > 0));
}
