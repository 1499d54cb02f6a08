//! `mesh-client`: use the mesh from a terminal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_core::model::{tiny, LocalModel, SamplingParams};

#[derive(Parser)]
#[command(
    name = "mesh-client",
    version,
    about = "Run language models on the mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with the embedded tiny model split into spans in this process.
    Demo {
        /// Text to continue.
        #[arg(long, default_value = "The mesh runs models on everyone's GPUs.")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 48)]
        max_tokens: usize,
        /// Number of spans to split the model into.
        #[arg(long, default_value_t = 3)]
        spans: u32,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Model directory; the embedded tiny model is written here when absent.
        #[arg(long)]
        model_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Demo {
            prompt,
            max_tokens,
            spans,
            temperature,
            seed,
            model_dir,
        } => {
            let dir = match model_dir {
                Some(dir) => dir,
                None => tiny::ensure(&tiny::default_dir())?,
            };
            let model = LocalModel::load_split(&dir, spans, &candle_core::Device::Cpu)
                .with_context(|| format!("loading {}", dir.display()))?;
            println!("model: {}", dir.display());
            for span in model.spans() {
                println!(
                    "  span {} ({:.1} MiB of weights)",
                    span.range(),
                    span.weight_bytes() as f64 / (1 << 20) as f64
                );
            }
            let params = SamplingParams {
                max_new_tokens: max_tokens,
                temperature,
                seed,
                ..SamplingParams::default()
            };
            print!("{prompt}");
            let started = std::time::Instant::now();
            let out = model.generate(&prompt, &params, |text| {
                print!("{text}");
                let _ = std::io::stdout().flush();
            })?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "\n-- {} tokens in {:.2} s ({:.1} tokens/s), finished by {:?}",
                out.tokens.len(),
                secs,
                out.tokens.len() as f64 / secs.max(1e-9),
                out.finish
            );
        }
    }
    Ok(())
}
