//! `mesh-node start`: config file + flags → checks → HTTP port → PID file → span → serve.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_core::config::{self, NodeFile, Resolved};
use mesh_core::daemon::{self, PidFile};
use mesh_core::http::schedule::SettleSchedule;
use mesh_core::http::{self, HttpState};
use mesh_core::identity::Identity;
use mesh_core::model::builtin::Builtin;
use mesh_core::model::{device, ModelFiles};
use mesh_core::node::{Node, NodeConfig};
use mesh_core::p2p::{Event, P2pConfig, Role};
use mesh_core::probe;
use mesh_core::ModelId;
use tokio::sync::watch;

use crate::cli::{ConfigArg, LogFormat, NodeFlags, StartArgs};
use crate::logging;

/// Set by `start --daemon` on the node it starts: its output is the log file, which it
/// then rotates itself (`[daemon] log_max_size`, `log_keep`).
const DAEMON_LOG_ENV: &str = "MESH_NODE_DAEMON_LOG";

/// The daemon's rotating log, held (not rotating) until the node serves, so that
/// `start --daemon` finds the start-up lines in one file.
static DAEMON_LOG: std::sync::OnceLock<daemon::RotatingLog> = std::sync::OnceLock::new();

/// How long `start --daemon` waits for the node to say it serves.
const DAEMON_START_LIMIT: Duration = Duration::from_secs(300);
/// How often the dashboard's chart gets a point and peer figures refresh.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The config file named by `--config`, or the default one; and whether it must exist.
pub fn config_path(arg: &ConfigArg) -> (PathBuf, bool) {
    match &arg.config {
        Some(path) => (path.clone(), true),
        None => (config::default_path(), false),
    }
}

/// Loads the config file (or the defaults) and its base directory.
pub fn load_config(arg: &ConfigArg) -> anyhow::Result<(NodeFile, PathBuf)> {
    let (path, required) = config_path(arg);
    let file = if required {
        NodeFile::load(&path)
    } else {
        NodeFile::load_or_default(&path)
    }
    .map_err(|e| anyhow::anyhow!("config {e}"))?;
    let base =
        std::path::absolute(config::base_dir(&path)).unwrap_or_else(|_| config::base_dir(&path));
    Ok((file, base))
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The shared flags win over the file.
pub fn apply_node_flags(file: &mut NodeFile, a: &NodeFlags) {
    let strings = |v: &[mesh_core::p2p::Multiaddr]| v.iter().map(ToString::to_string).collect();
    if let Some(v) = &a.model {
        file.model = v.clone();
    }
    if let Some(v) = &a.model_dir {
        file.model_dir = Some(mesh_core::model::hub::absolute_or_id(v, abs));
    }
    if let Some(v) = a.blocks {
        file.blocks = Some(format!("{}..{}", v.start, v.end));
    }
    if let Some(v) = a.span_len {
        file.span_len = Some(v);
    }
    if let Some(v) = &a.dtype {
        file.dtype = v.clone();
    }
    if let Some(v) = &a.quantize {
        file.quantize = Some(v.clone());
    }
    if let Some(v) = &a.device {
        file.device = v.clone();
    }
    let l = &mut file.limits;
    l.max_sessions = a.max_sessions.unwrap_or(l.max_sessions);
    l.max_sessions_per_client = a
        .max_sessions_per_client
        .unwrap_or(l.max_sessions_per_client);
    l.cache_budget_mib = a.cache_budget_mib.unwrap_or(l.cache_budget_mib);
    l.idle_timeout_secs = a.idle_timeout_secs.unwrap_or(l.idle_timeout_secs);
    l.max_len = a.max_len.unwrap_or(l.max_len);
    l.max_batch = a.max_batch.unwrap_or(l.max_batch);
    let n = &mut file.network;
    if !a.listen.is_empty() {
        n.listen = strings(&a.listen);
    }
    if !a.bootstrap.is_empty() {
        n.bootstrap = strings(&a.bootstrap);
    }
    if !a.public_addr.is_empty() {
        n.public_addr = strings(&a.public_addr);
    }
    n.heartbeat_secs = a.heartbeat_secs.unwrap_or(n.heartbeat_secs);
    n.announce_secs = a.announce_secs.unwrap_or(n.announce_secs);
    if let Some(v) = &a.key {
        file.key = Some(abs(v));
    }
    file.price_per_token = a.price_per_token.unwrap_or(file.price_per_token);
    if let Some(v) = &a.ledger_dir {
        file.ledger_dir = Some(abs(v));
    }
    apply_nat_flags(&mut file.nat, &a.nat);
}

fn apply_nat_flags(n: &mut mesh_core::config::Nat, a: &crate::cli::NatFlags) {
    if let Some(v) = &a.relay {
        n.relay = v.clone();
    }
    if !a.relay_via.is_empty() {
        n.relay_via = a.relay_via.iter().map(ToString::to_string).collect();
    }
    n.upnp |= a.upnp;
    n.autonat_private_ips |= a.autonat_private_ips;
    n.relay_server |= a.relay_server;
    n.relay_max_reservations = a.relay_max_reservations.unwrap_or(n.relay_max_reservations);
    n.relay_max_circuits = a.relay_max_circuits.unwrap_or(n.relay_max_circuits);
    n.relay_max_circuit_secs = a.relay_max_circuit_secs.unwrap_or(n.relay_max_circuit_secs);
    n.relay_max_circuit_kib = a.relay_max_circuit_kib.unwrap_or(n.relay_max_circuit_kib);
}

/// `start`'s own flags, then the shared ones, win over the file.
fn apply_overrides(file: &mut NodeFile, a: &StartArgs) {
    apply_node_flags(file, &a.node);
    if let Some(v) = a.http {
        file.http.listen = v.to_string();
    }
    if let Some(v) = &a.pid_file {
        file.daemon.pid_file = Some(abs(v));
    }
    if let Some(v) = &a.log_file {
        file.daemon.log_file = Some(abs(v));
    }
    if let Some(v) = a.log_format {
        file.log_format = match v {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        };
    }
}

/// The file, the flags, and their checked combination.
pub fn resolve(args: &StartArgs) -> anyhow::Result<Resolved> {
    let (mut file, base) = load_config(&args.config)?;
    apply_overrides(&mut file, args);
    file.resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))
}

/// The model directory to serve: the configured one, or the built-in model named.
pub fn model_dir(r: &Resolved) -> anyhow::Result<PathBuf> {
    match (&r.model_dir, Builtin::named(r.model.as_str())) {
        (Some(dir), _) => Ok(dir.clone()),
        (None, Some(b)) => b
            .ensure()
            .with_context(|| format!("writing the built-in model {}", b.id())),
        (None, None) => anyhow::bail!("model {}: no --model-dir and not built in", r.model),
    }
}

/// The node's peer settings from its config.
pub fn p2p_config(r: &Resolved, identity: Identity) -> P2pConfig {
    let mut p2p = P2pConfig::new(identity, Role::Server);
    p2p.listen = r.listen.clone();
    p2p.bootstrap = r.bootstrap.clone();
    p2p.public_addrs = r.public_addrs.clone();
    p2p.heartbeat_interval = r.heartbeat_interval;
    p2p.announce_interval = r.announce_interval;
    p2p.record_ttl = r.announce_interval * 3;
    p2p.max_connections = r.max_connections;
    p2p.max_connections_per_ip = r.max_connections_per_ip;
    p2p.nat = r.nat.clone();
    p2p
}

/// Everything checked before any file is written or port bound: the model directory, the
/// key, the span against the model and against free memory.
struct Checked {
    node: NodeConfig,
    pid_file: PathBuf,
    http: std::net::SocketAddr,
    settle: Option<SettleSchedule>,
}

fn preflight(r: &Resolved, num_blocks_flag: Option<u32>) -> anyhow::Result<Checked> {
    let model = ModelId::new(r.model.clone());
    let model_dir = model_dir(r)?;
    let files = ModelFiles::open(&model_dir)
        .and_then(|files| files.check_weights().map(|()| files))
        .with_context(|| format!("model directory {}", model_dir.display()))?;
    let num_blocks = files.config.num_blocks();
    if let Some(n) = num_blocks_flag.filter(|&n| n != num_blocks) {
        bail!(
            "--num-blocks {n} does not match {} ({num_blocks} blocks)",
            model_dir.display()
        );
    }
    if let Some(span) = r.blocks.filter(|s| !s.fits(num_blocks)) {
        bail!(
            "blocks {}..{} are outside the model's {num_blocks} blocks",
            span.start,
            span.end
        );
    }
    let identity = Identity::load_or_create(&r.key)
        .with_context(|| format!("identity key {}", r.key.display()))?;
    logging::set_peer_id(&identity.peer_id().to_string());

    // The device: a GPU asked for but unusable is said once, loudly, and the CPU serves.
    let selected = device::select(r.device);
    if selected.fell_back {
        tracing::warn!(
            "device {} cannot be used; serving from {}",
            r.device,
            selected.description
        );
    } else {
        tracing::info!(device = %selected.description, "serving from");
    }

    // Sizing: the weights of the span plus the KV-cache budget must fit in free memory
    // of the device: VRAM on a GPU, RAM on the CPU.
    let (free, memory) =
        probe::free_memory_for(&selected.device, probe::probe_memory().available_bytes);
    let sizing = probe::size_span(
        &files.config,
        r.blocks,
        r.span_len,
        probe::SpanFormat::of(&files, r.dtype, r.quantize),
        r.limits.cache_budget_bytes as u64,
        free,
        memory,
    )?;
    let span_len = match (r.blocks, r.span_len) {
        (None, None) if sizing.blocks < num_blocks => {
            tracing::info!(
                fit = sizing.blocks,
                num_blocks,
                "taking only the blocks that fit in memory"
            );
            Some(sizing.blocks)
        }
        _ => r.span_len,
    };

    Ok(Checked {
        node: NodeConfig {
            model_id: model,
            model_dir,
            span: r.blocks,
            span_len,
            dtype: r.dtype,
            quantize: r.quantize,
            device: selected.device,
            limits: r.limits.clone(),
            price_per_token: r.price_per_token,
            ledger_dir: Some(r.ledger_dir.clone()),
            p2p: p2p_config(r, identity),
            // Filled from the machine probe once the node starts.
            capability: Default::default(),
        },
        pid_file: r.pid_file.clone(),
        http: r.http,
        settle: r.settle,
    })
}

/// A node with no bootstrap serves alone: nobody can find it and it earns nothing, which
/// is a mistake unless asked for (`--standalone`).
fn check_joins_a_mesh(r: &Resolved, standalone: bool) -> anyhow::Result<()> {
    if r.bootstrap.is_empty() && !standalone {
        bail!(
            "no bootstrap peer configured: this node would serve alone and nobody could reach \
             it. Join a mesh: `mesh-node init --bootstrap <address>` (or `start --bootstrap \
             <address>`, or `bootstrap = [...]` under [network] in node.toml); to serve alone \
             on purpose, pass --standalone"
        );
    }
    Ok(())
}

/// The node bills into its ledger, so a ledger that fails its check (sled cannot read it,
/// it holds fewer receipts than its high-water mark, its records disagree) stops `start`
/// before any port is bound, with the path and the recovery step. Serving on it would sign
/// receipts that are never kept: work done for nothing, and nobody told.
fn check_ledger(dir: &Path) -> anyhow::Result<()> {
    let store = mesh_core::ledger::Store::open(dir)?;
    store
        .audit()
        .map_err(|e| mesh_core::ledger::StoreError::Damaged {
            path: dir.to_owned(),
            detail: e.to_string(),
        })?;
    Ok(())
}

pub fn start(args: StartArgs) -> anyhow::Result<()> {
    let resolved = resolve(&args)?;
    if args.daemon {
        // Check what can be checked here, so the common mistakes fail in the foreground.
        preflight(&resolved, args.node.num_blocks)?;
        check_joins_a_mesh(&resolved, args.standalone)?;
        if let Some(pid) = daemon::running_pid(&resolved.pid_file)? {
            return Err(daemon::DaemonError::AlreadyRunning {
                pid,
                path: resolved.pid_file.clone(),
            }
            .into());
        }
        check_ledger(&resolved.ledger_dir)?;
        return spawn_daemon(&resolved.log_file, &resolved.pid_file);
    }
    match resolved.log_rotation {
        Some(rotation) if std::env::var_os(DAEMON_LOG_ENV).is_some() => {
            let log = daemon::RotatingLog::open(&resolved.log_file, rotation, true)?;
            log.pause(true);
            let _ = DAEMON_LOG.set(log.clone());
            logging::init_rotating(resolved.json_logs, "info,libp2p=warn", log);
        }
        _ => logging::init(resolved.json_logs, "info,libp2p=warn"),
    }
    let checked = preflight(&resolved, args.node.num_blocks)?;
    check_joins_a_mesh(&resolved, args.standalone)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(serve(checked))
}

/// Re-runs this command without `--daemon`, detached, output to `log_file`; returns once
/// the node prints `serving`, or fails with the log's tail if it exits first.
fn spawn_daemon(log_file: &Path, pid_file: &Path) -> anyhow::Result<()> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("log directory {}", dir.display()))?;
    }
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .with_context(|| format!("log file {}", log_file.display()))
    };
    let log = open_log()?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("finding this executable")?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon" && a != "-d")
        .collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .env(DAEMON_LOG_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    #[cfg(unix)]
    {
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    let mut child = cmd.spawn().context("starting the node in the background")?;
    let pid = child.id();
    let started = Instant::now();
    loop {
        let text = read_from(log_file, offset);
        if let Some(status) = child.try_wait().context("waiting for the node")? {
            bail!(
                "the node exited during start ({status}); last lines of {}:\n{}",
                log_file.display(),
                tail(&text, 20)
            );
        }
        let serving = if text.lines().any(|l| l.starts_with("serving ")) {
            Some(
                text.lines()
                    .filter(|l| {
                        ["peer id ", "http on ", "listening on ", "serving "]
                            .iter()
                            .any(|p| l.starts_with(p))
                    })
                    .map(str::to_owned)
                    .collect(),
            )
        } else {
            // Its log rotated past the start-up lines already: ask the node.
            serving_from_health(pid_file)
        };
        if let Some(lines) = serving {
            for line in lines {
                println!("{line}");
            }
            println!(
                "started in the background, pid {pid}; log {}",
                log_file.display()
            );
            return Ok(());
        }
        if started.elapsed() > DAEMON_START_LIMIT {
            bail!(
                "the node (pid {pid}) has not started serving after {DAEMON_START_LIMIT:?}; it \
                 may still be loading: see {} and `mesh-node status`",
                log_file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the log holds after `offset` (the node does not rotate it until it serves).
/// The start-up lines, from `/healthz`, once the node says it serves.
fn serving_from_health(pid_file: &Path) -> Option<Vec<String>> {
    let addr = daemon::read_http_addr(pid_file)?;
    let (code, body) = http::get(addr, "/healthz", Duration::from_secs(2)).ok()?;
    let h: http::Health = serde_json::from_str(&body).ok()?;
    if code != 200 || h.status == "starting" {
        return None;
    }
    let mut lines = vec![format!("http on {addr}")];
    lines.extend(h.peer_id.map(|p| format!("peer id {p}")));
    lines.extend(h.listen_addrs.iter().map(|a| format!("listening on {a}")));
    lines.push(format!(
        "serving {} blocks {} of {}",
        h.model.unwrap_or_default(),
        h.span.unwrap_or_default(),
        h.num_blocks.unwrap_or(0)
    ));
    Some(lines)
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.take(1 << 20).read_to_string(&mut text);
        }
    }
    text
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Resolves once Ctrl-C or SIGTERM arrives; the handlers are installed before it returns,
/// so a signal during start-up is not lost.
fn shutdown_listener() -> anyhow::Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

async fn serve(checked: Checked) -> anyhow::Result<()> {
    let Checked {
        node: mut cfg,
        pid_file,
        http: http_addr,
        settle,
    } = checked;
    let shutdown = shutdown_listener()?;
    if let Some(pid) = daemon::running_pid(&pid_file)? {
        return Err(daemon::DaemonError::AlreadyRunning {
            pid,
            path: pid_file,
        }
        .into());
    }
    if let Some(dir) = &cfg.ledger_dir {
        check_ledger(dir)?;
    }
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| {
            format!(
            "HTTP port {http_addr}: cannot listen (another mesh-node? set [http] listen in the \
             config or pass --http 127.0.0.1:0)"
        )
        })?;
    let http_addr = listener.local_addr().context("HTTP port")?;
    let claim = PidFile::claim(&pid_file)?;
    claim.set_http_addr(http_addr)?;
    let data_dir = mesh_core::paths::mesh_home();
    let machine = tokio::task::spawn_blocking(move || probe::probe(&data_dir)).await?;
    cfg.capability = machine.capability();
    let state = HttpState::new(machine);
    let http_task = tokio::spawn(http::serve(
        listener,
        state.clone(),
        stopped(shutdown.clone()),
    ));
    println!("http on {http_addr}");
    // Started before the span loads, so /healthz shows VRAM filling while it does.
    let sampler = tokio::spawn(state.clone().sample(SAMPLE_EVERY));
    // Settles once the node is up, each period, while it runs.
    let scheduler = settle.map(|s| tokio::spawn(state.clone().settle_on_schedule(s)));
    let stop_tasks = move || {
        sampler.abort();
        if let Some(s) = &scheduler {
            s.abort();
        }
    };

    let node = tokio::select! {
        node = Node::start(cfg) => node,
        () = stopped(shutdown.clone()) => {
            stop_tasks();
            println!("stopped before serving");
            return Ok(());
        }
    };
    let node = node.inspect_err(|_| stop_tasks())?;
    let peer_id = node.peer_id();
    state.set_node(node.handle());
    println!("peer id {peer_id}");
    for addr in node.listen_addrs() {
        println!("listening on {addr}");
    }
    let ann = node.announcement();
    // Quantized weights are said; full precision reads as it always has.
    let weights = if ann.quantization.is_empty() {
        String::new()
    } else {
        format!(" ({})", ann.quantization)
    };
    println!(
        "serving {} blocks {} of {}{weights}",
        ann.model, ann.span, ann.num_blocks
    );
    if let Some(log) = DAEMON_LOG.get() {
        log.pause(false);
    }
    let span = tracing::info_span!("node", peer_id = %peer_id);
    let result = tracing::Instrument::instrument(
        node.run(stopped(shutdown), |event| match event {
            Event::ServerUp(info) => println!(
                "server up {} {} {} price {}",
                info.peer_id, info.model, info.span, info.price_per_token
            ),
            Event::ServerDown { peer, model } => println!("server down {peer} {model}"),
            Event::InboundRequest { .. } => {}
        }),
        span,
    )
    .await;
    stop_tasks();
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    drop(claim);
    result?;
    println!("stopped");
    Ok(())
}
