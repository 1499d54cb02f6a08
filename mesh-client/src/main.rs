//! `mesh-client`: use the mesh from a terminal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use mesh_client::demo::ProcessMesh;
use mesh_client::{ChatMessage, MeshClient, SamplingParams};
use mesh_core::model::builtin;
use mesh_core::model::{DeviceSpec, LocalModel};
use mesh_core::p2p::Multiaddr;
use mesh_core::pipeline::VerifyConfig;
use mesh_core::BlockRange;

mod printing;
use printing::{print_receipts, stream, weights_label};

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

#[derive(Args, Clone)]
struct Sampling {
    /// Text to continue.
    #[arg(long, default_value = "The mesh runs models on everyone's GPUs.")]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Penalty on tokens already in the sequence (1 = none). Off by default, as in the
    /// OpenAI gateway and transformers' `generate`, so `--temperature 0` is plain greedy.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampling seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Sampling {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: Some(self.top_k),
            top_p: Some(self.top_p),
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_tokens: Vec::new(),
        }
    }
}

#[derive(Args)]
struct MeshArgs {
    /// Peers to join through (with /p2p/<id>), repeatable.
    #[arg(long, required = true)]
    bootstrap: Vec<Multiaddr>,
    /// Model name on the mesh; default: the built-in model --model-dir holds, else
    /// mesh-demo.
    #[arg(long)]
    model: Option<String>,
    /// Local model directory (embeddings, LM head, tokenizer), a .gguf file, or a hub id
    /// found in the local Hugging Face cache; default: the built-in model named.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Whether servers with quantized weights may serve (mixed with full-precision ones);
    /// false uses only full-precision servers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allow_quantized: bool,
    /// Refuse servers above this price (micro-units per token per block).
    #[arg(long)]
    max_price: Option<u64>,
    /// Refuse servers asking more than this many times the median price of the servers
    /// of their blocks (0: no relative ceiling, only --max-price).
    #[arg(long, default_value_t = mesh_core::pipeline::DEFAULT_MAX_PRICE_RATIO)]
    max_price_ratio: f64,
    /// The client's identity and receipts [default: $MESH_HOME/client].
    #[arg(long)]
    ledger_dir: Option<PathBuf>,
    /// Re-check this fraction (0..1) of every hop's steps against a second opinion; a
    /// server caught lying is banned and never paid (docs/architecture.md).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    verify: f64,
    /// Give second opinions from the local model directory's own blocks instead of asking
    /// other servers (it must hold every block's weights).
    #[arg(long)]
    verify_locally: bool,
    /// Speculative decoding: a small model with the same tokenizer (a directory, or a
    /// built-in name such as mesh-demo-draft) runs here and proposes tokens that one step
    /// through the mesh checks. The text is the same as without it.
    #[arg(long)]
    draft_model: Option<String>,
    /// Draft tokens proposed per step at first (adapted to how many are accepted).
    #[arg(long, default_value_t = mesh_client::DEFAULT_DRAFT_TOKENS)]
    draft_tokens: usize,
    /// Where the client's embeddings and LM head compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// When no server covers some blocks within the discovery window: `local` runs them
    /// here from the model directory's weights (until servers of them appear), `none`
    /// stops with an error naming them.
    #[arg(long, value_enum, default_value_t = Fallback::None)]
    fallback: Fallback,
    /// Every server's output comes back through this client, as before push: one round
    /// trip per server and token instead of servers passing it on to each other.
    #[arg(long)]
    no_push: bool,
    /// Seconds to wait, on joining, for servers of every block: the discovery window
    /// after which blocks none covers are an error, or run here with --fallback local.
    #[arg(long, default_value_t = 30.0, value_parser = parse_secs)]
    discovery_secs: f64,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

/// What to do about blocks no server covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Fallback {
    None,
    Local,
}

/// Who may use a shared gateway, and how often.
#[derive(Args)]
struct Access {
    /// API keys accepted, one per line with an optional name after it (`# ` comments);
    /// requests without one of them get 401. Without this flag the gateway is open.
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Requests per minute each key may make, on average (0: no limit).
    #[arg(long, default_value_t = 60.0)]
    rate_limit: f64,
    /// Requests a key may make at once before the rate applies.
    #[arg(long, default_value_t = 10)]
    burst: u32,
}

impl Access {
    fn config(&self) -> anyhow::Result<mesh_client::openai::GatewayConfig> {
        let keys = match &self.api_keys {
            Some(path) => Some(mesh_client::openai::ApiKeys::load(path)?),
            None => None,
        };
        anyhow::ensure!(
            self.rate_limit >= 0.0 && self.rate_limit.is_finite(),
            "--rate-limit must be a number of requests per minute, 0 or more"
        );
        anyhow::ensure!(self.burst >= 1, "--burst must be at least 1");
        let rate_limit = (self.rate_limit > 0.0).then_some(mesh_client::openai::RateLimit {
            per_minute: self.rate_limit,
            burst: self.burst,
        });
        Ok(mesh_client::openai::GatewayConfig { keys, rate_limit })
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

/// How long `nodes` waits to hear servers that cover every block (a heartbeat interval is
/// 15 s by default) before listing those heard.
const NODES_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn default_ledger_dir() -> PathBuf {
    mesh_core::paths::mesh_home().join("client")
}

#[derive(Subcommand)]
enum Command {
    /// Start a bootstrap and 3 nodes on this machine (child processes on loopback), stream
    /// a generation through them with the route and per-token latency, and stop them.
    Demo {
        #[command(flatten)]
        sampling: Sampling,
        /// Nodes to split the built-in demo model over.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Re-check this fraction (0..1) of every hop's steps against the client's own copy
        /// of the demo model.
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        verify: f64,
        /// Where the nodes and the client compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Blocks no node covers (a node that died): `local` runs them in the client.
        #[arg(long, value_enum, default_value_t = Fallback::Local)]
        fallback: Fallback,
    },
    /// Generate text through the mesh.
    Generate {
        #[command(flatten)]
        mesh: MeshArgs,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions)
    /// backed by the mesh, until Ctrl-C.
    ServeOpenai {
        #[command(flatten)]
        mesh: MeshArgs,
        /// Local port.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Address to bind (keep it local unless you mean to share it, with --api-keys).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[command(flatten)]
        access: Access,
    },
    /// Chat interactively: each line you type is a user turn; the reply streams back.
    Chat {
        #[command(flatten)]
        mesh: MeshArgs,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Receipts this client countersigned (newest first).
    Receipts {
        /// The client's ledger [default: $MESH_HOME/client].
        #[arg(long)]
        ledger_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Check a settlement batch file offline: every signature, every total.
    VerifyBatch {
        /// The batch JSON written by `mesh-node settle`.
        file: PathBuf,
    },
    /// List the live servers of a model and the blocks they cover.
    Nodes {
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Generate with the model split into spans inside this process (no network).
    Local {
        #[command(flatten)]
        sampling: Sampling,
        #[arg(long, default_value_t = 3)]
        spans: u32,
        /// Model directory, .gguf file or cached hub id; default: the built-in demo model.
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// Where the spans and the head compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Quantize the spans on load: q8_0 or q4k [default: full precision].
        #[arg(long)]
        quantize: Option<mesh_core::model::Quantization>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo {
            sampling,
            nodes,
            verify,
            device,
            fallback,
        } => demo(sampling, nodes, verify, device, fallback).await,
        Command::Generate { mesh, sampling } => {
            let client = connect(mesh).await?;
            stream(&client, &sampling).await
        }
        Command::ServeOpenai {
            mesh,
            port,
            host,
            access,
        } => {
            let config = access.config()?;
            let client = connect(mesh).await?;
            let listener = tokio::net::TcpListener::bind((host, port))
                .await
                .with_context(|| format!("binding {host}:{port}"))?;
            println!(
                "OpenAI-compatible API on http://{}/v1",
                listener.local_addr()?
            );
            match &config.keys {
                Some(keys) => println!(
                    "{} API keys; {}",
                    keys.names().count(),
                    config
                        .rate_limit
                        .map_or("no rate limit".into(), |r| format!(
                            "{} requests per minute per key, bursts of {}",
                            r.per_minute, r.burst
                        ))
                ),
                None => println!("no API keys: open to anyone who can reach it"),
            }
            mesh_client::openai::serve_with(client, listener, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(())
        }
        Command::Chat { mesh, sampling } => chat(connect(mesh).await?, sampling).await,
        Command::Receipts { ledger_dir, limit } => {
            let dir = ledger_dir
                .unwrap_or_else(default_ledger_dir)
                .join("receipts");
            if !dir.exists() {
                println!("no receipts yet ({} does not exist)", dir.display());
                return Ok(());
            }
            // Listing never writes the ledger (nor waits on a client holding it).
            let store = mesh_core::ledger::Store::open_read_only(&dir)?;
            let mut shown = 0;
            for entry in store.newest(limit)? {
                let signed = entry.countersigned.as_ref().unwrap_or(&entry.latest);
                let r = &signed.receipt;
                println!(
                    "{} {} blocks {} prefill {} decode {} amount {} seq {}{}",
                    mesh_core::ledger::utc_day(r.start_ms),
                    r.terms.server,
                    r.terms.span,
                    r.prefill_tokens,
                    r.decode_tokens,
                    r.amount,
                    r.seq,
                    if signed.is_countersigned() {
                        ""
                    } else {
                        " (not countersigned)"
                    }
                );
                shown += 1;
            }
            if shown == 0 {
                println!("no receipts yet");
            }
            Ok(())
        }
        Command::VerifyBatch { file } => {
            let summary = mesh_core::ledger::verify_batch(&file)
                .with_context(|| format!("{} does not verify", file.display()))?;
            println!("{} verifies\n{summary}", file.display());
            Ok(())
        }
        Command::Nodes { mesh } => {
            let client = connect(mesh).await?;
            // A fresh client has heard no heartbeat yet: list the servers once they are heard.
            for s in client.nodes_when_heard(NODES_WAIT).await? {
                // Live VRAM and utilisation, for servers that send them.
                let gpus: String = s
                    .gpu_live
                    .iter()
                    .map(|g| format!("  {}", g.short()))
                    .collect();
                println!(
                    "{} blocks {} of {}  {}  {:.1} tok/s/block  {} sessions  price {}{gpus}  [{}]",
                    s.peer_id,
                    s.span,
                    s.num_blocks,
                    weights_label(&s.quantization),
                    s.load.throughput_tps,
                    s.load.active_sessions,
                    s.price_per_token,
                    s.capability
                );
            }
            Ok(())
        }
        Command::Local {
            sampling,
            spans,
            model_dir,
            device,
            quantize,
        } => local(sampling, spans, model_dir, device, quantize),
    }
}

async fn connect(args: MeshArgs) -> anyhow::Result<MeshClient> {
    let mut b = MeshClient::builder().bootstrap(args.bootstrap);
    if let Some(model) = args.model {
        b = b.model(model);
    }
    if let Some(dir) = args.model_dir {
        b = b.model_dir(dir);
    }
    if let Some(p) = args.max_price {
        b = b.max_price(p);
    }
    b = b.max_price_ratio((args.max_price_ratio > 0.0).then_some(args.max_price_ratio));
    b = b.allow_quantized(args.allow_quantized);
    b = b
        .ledger_dir(args.ledger_dir.unwrap_or_else(default_ledger_dir))
        .verify(VerifyConfig {
            rate: args.verify,
            ..VerifyConfig::default()
        })
        .verify_locally(args.verify_locally)
        .fallback_local(args.fallback == Fallback::Local)
        .discovery_timeout(std::time::Duration::from_secs_f64(args.discovery_secs))
        .device(args.device)
        .push(!args.no_push)
        .draft_tokens(args.draft_tokens);
    if let Some(draft) = args.draft_model {
        b = b.draft_model_dir(match builtin::Builtin::named(&draft) {
            Some(model) => model.ensure()?,
            None => PathBuf::from(draft),
        });
    }
    // Finding servers that cover every block can take seconds: show that it is working.
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message("joining the mesh and waiting for servers of every block");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let client = b.build().await;
    spinner.finish_and_clear();
    Ok(client?)
}

async fn demo(
    sampling: Sampling,
    nodes: u32,
    verify: f64,
    device: DeviceSpec,
    fallback: Fallback,
) -> anyhow::Result<()> {
    let home = tempdir_for_demo()?;
    let model_dir = builtin::DEFAULT.ensure()?;
    // The nodes read the same model from their MESH_HOME: written once here, not by each.
    builtin::DEFAULT.ensure_under(&home.join("models"))?;
    let num_blocks = mesh_core::model::ModelFiles::open(&model_dir)?
        .config
        .num_blocks();
    let spans = BlockRange::even_split(num_blocks, nodes);
    println!(
        "starting a bootstrap and {} nodes on 127.0.0.1 ...",
        spans.len()
    );
    let mesh = tokio::task::spawn_blocking({
        let home = home.clone();
        move || ProcessMesh::start(&home, &spans, device)
    })
    .await??;
    println!("bootstrap {}", mesh.bootstrap());
    for (addr, span) in &mesh.servers {
        println!("node blocks {span} at {addr}");
    }
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap().clone()])
        .model_dir(model_dir)
        .ledger_dir(home.join("client"))
        .verify(VerifyConfig {
            rate: verify,
            ..VerifyConfig::default()
        })
        .verify_locally(true)
        .fallback_local(fallback == Fallback::Local)
        .device(device)
        .build()
        .await
        .context("joining the local mesh")?;
    let result = stream(&client, &sampling).await;
    if result.is_ok() {
        // The stream ends only after every hop's session closed with its final receipt.
        print_receipts(&client)?;
    }
    let mut mesh = mesh;
    tokio::task::spawn_blocking(move || mesh.stop()).await?;
    let _ = std::fs::remove_dir_all(&home);
    println!("stopped every process");
    result
}

async fn chat(client: MeshClient, sampling: Sampling) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut history: Vec<ChatMessage> = Vec::new();
    eprintln!("chatting with {} (Ctrl-D to end)", client.model());
    loop {
        eprint!("> ");
        let Some(line) = lines.next_line().await? else {
            break;
        };
        if line.trim().is_empty() {
            continue;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line,
        });
        let mut reply = String::new();
        let mut tokens = client.chat(&history, sampling.params()).await?;
        while let Some(token) = tokens.next().await {
            let token = token?;
            print!("{}", token.text);
            let _ = std::io::stdout().flush();
            reply.push_str(&token.text);
        }
        println!();
        history.push(ChatMessage {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}

fn tempdir_for_demo() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn local(
    sampling: Sampling,
    spans: u32,
    model_dir: Option<PathBuf>,
    device: DeviceSpec,
    quantize: Option<mesh_core::model::Quantization>,
) -> anyhow::Result<()> {
    let dir = match model_dir {
        Some(dir) => dir,
        None => builtin::DEFAULT.ensure()?,
    };
    let selected = mesh_core::model::device::select(device);
    eprintln!("computing on {}", selected.description);
    let num_blocks = mesh_core::model::ModelFiles::open(&dir)?
        .config
        .num_blocks();
    let ranges = mesh_core::BlockRange::even_split(num_blocks, spans);
    let model = LocalModel::load_spans_quantized(
        &dir,
        &ranges,
        candle_core::DType::F32,
        quantize,
        &selected.device,
    )
    .with_context(|| format!("loading {}", dir.display()))?;
    for span in model.spans() {
        println!(
            "span {} ({:.1} MiB of weights, {})",
            span.range(),
            span.weight_bytes() as f64 / (1 << 20) as f64,
            span.quantization().unwrap_or("full precision")
        );
    }
    print!("{}", sampling.prompt);
    let out = model.generate(&sampling.prompt, &sampling.params(), |text| {
        print!("{text}");
        let _ = std::io::stdout().flush();
    })?;
    println!(
        "\n-- {} tokens, finished by {:?}",
        out.tokens.len(),
        out.finish
    );
    Ok(())
}
