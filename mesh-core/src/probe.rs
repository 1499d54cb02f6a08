//! What this machine can give the mesh: CPU, memory, free disk and GPUs, and whether a span
//! of a model fits.
//!
//! ```
//! let p = mesh_core::probe::probe(&std::env::temp_dir());
//! assert!(p.cpu.cores >= 1);
//! println!("{}", serde_json::to_string_pretty(&p).unwrap());
//! ```
//!
//! Everything is read without privileges: `/proc/cpuinfo` and `/proc/meminfo` on Linux,
//! `statvfs` for the disk, and `nvidia-smi` (when on the `PATH`) or
//! `/proc/driver/nvidia` for GPUs. A figure that cannot be read is `None` or absent, never
//! an error: a probe always answers. No GPU found is a clean empty list with a note.
//!
//! The probe is a start-up snapshot; what changes while a node runs (GPU memory used and
//! utilisation) is read again by [`gpu_live`] and kept by a [`GpuReadings`] sampler.

mod live;

pub use live::{
    gpu_live, load_average, process_cpu_seconds, GpuReadings, GPU_LIVE_TIMEOUT, MIN_GPU_SAMPLE,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::model::{LlamaConfig, ModelFiles, Quantization, SpanCache};
use crate::types::{BlockRange, Capability, GpuSummary};

/// The machine, as far as mesh cares.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu: Cpu,
    pub memory: Memory,
    /// Free space where the node keeps its files.
    pub disk: Option<Disk>,
    pub gpus: Vec<Gpu>,
    /// Why `gpus` is empty, or where the figures came from.
    pub gpu_note: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// `model name` from `/proc/cpuinfo`; empty where unknown.
    pub model: String,
    /// Logical cores this process may use.
    pub cores: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub total_bytes: Option<u64>,
    /// `MemAvailable`: what can be allocated without swapping.
    pub available_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub vram_total_bytes: Option<u64>,
    pub vram_free_bytes: Option<u64>,
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
}

/// Probes the machine; `data_dir` is where the node keeps its files (for free disk).
pub fn probe(data_dir: &Path) -> Probe {
    let (gpus, gpu_note) = gpus();
    Probe {
        hostname: hostname(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        cpu: Cpu {
            model: cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        memory: probe_memory(),
        disk: disk(data_dir),
        gpus,
        gpu_note,
    }
}

impl Probe {
    /// The compact summary heartbeats carry: cores, RAM, GPU names and VRAM, trimmed to the
    /// bounds receivers check ([`Capability::is_valid`]).
    pub fn capability(&self) -> Capability {
        Capability {
            cpu_cores: u32::try_from(self.cpu.cores).unwrap_or(u32::MAX),
            ram_bytes: self.memory.total_bytes.unwrap_or(0),
            gpus: self
                .gpus
                .iter()
                .take(Capability::MAX_GPUS)
                .map(|g| GpuSummary {
                    name: bounded_name(&g.name),
                    vram_bytes: g.vram_total_bytes.unwrap_or(0),
                })
                .collect(),
        }
    }
}

/// A GPU name without control characters, cut at a char boundary to the heartbeat's limit.
fn bounded_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > Capability::MAX_GPU_NAME {
            break;
        }
        out.push(c);
    }
    out
}

/// This machine's [`Capability`] (cores, RAM, GPUs; no disk), probed once per process:
/// the hardware does not change while a node runs, and `nvidia-smi` is slow.
pub fn capability() -> Capability {
    static ONCE: std::sync::OnceLock<Capability> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let (gpus, gpu_note) = gpus();
        Probe {
            cpu: Cpu {
                model: String::new(),
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            memory: probe_memory(),
            gpus,
            gpu_note,
            ..Probe::default()
        }
        .capability()
    })
    .clone()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "cpu model").then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Free memory where a span on `device` would live, and its name for messages: the GPU's
/// VRAM as its driver reports it now, or the machine's available RAM.
pub fn free_memory_for(
    device: &candle_core::Device,
    ram_available: Option<u64>,
) -> (Option<u64>, &'static str) {
    match crate::model::device::vram(device) {
        Some(v) => (Some(v.free_bytes), "VRAM"),
        None => (ram_available, "RAM"),
    }
}

/// Total and available RAM (cheap: one read of `/proc/meminfo`).
pub fn probe_memory() -> Memory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Memory {
        total_bytes: meminfo_field(&text, "MemTotal"),
        available_bytes: meminfo_field(&text, "MemAvailable"),
    }
}

/// A `Key:   123 kB` line of `/proc/meminfo`, in bytes.
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// Resident memory of this process, from `/proc/self/status`.
pub fn process_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&text, "VmRSS")
}

/// Free and total bytes of the file system holding `path` (or its nearest existing parent).
fn disk(path: &Path) -> Option<Disk> {
    let existing = path.ancestors().find(|p| p.exists())?;
    statvfs(existing).map(|(total_bytes, free_bytes)| Disk {
        path: existing.to_owned(),
        total_bytes,
        free_bytes,
    })
}

#[cfg(unix)]
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, avail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bavail as u64);
    let frsize = frsize.max(1);
    Some((blocks.saturating_mul(frsize), avail.saturating_mul(frsize)))
}

#[cfg(not(unix))]
fn statvfs(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// GPUs from `nvidia-smi`, else names from `/proc/driver/nvidia`, else none.
fn gpus() -> (Vec<Gpu>, String) {
    if let Some(gpus) = nvidia_smi() {
        if !gpus.is_empty() {
            return (gpus, "figures from nvidia-smi".into());
        }
    }
    let from_proc = proc_nvidia();
    if !from_proc.is_empty() {
        return (
            from_proc,
            "names from /proc/driver/nvidia (nvidia-smi not found: no VRAM figures)".into(),
        );
    }
    let note = if cfg!(feature = "cuda") {
        "no GPU: no NVIDIA driver found"
    } else {
        "no GPU: no NVIDIA driver found (and this build has no `cuda` feature)"
    };
    (Vec::new(), note.into())
}

/// Most bytes of a command's output read ([`run_bounded`]).
const MAX_COMMAND_OUTPUT: u64 = 1 << 20;

/// Runs a command for at most `limit`, returning stdout (up to [`MAX_COMMAND_OUTPUT`]
/// bytes) if it succeeded. Never waits much longer: at the limit the command is killed and,
/// if it does not die at once (a process stuck in a hung driver may not), left behind.
fn run_bounded(cmd: &str, args: &[&str], limit: Duration) -> Option<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                // Reap it if it goes promptly; a blocking wait could hang on a stuck one.
                for _ in 0..10 {
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    let stdout = child.stdout.take()?;
    std::io::Read::read_to_string(
        &mut std::io::Read::take(stdout, MAX_COMMAND_OUTPUT),
        &mut out,
    )
    .ok()?;
    Some(out)
}

fn nvidia_smi() -> Option<Vec<Gpu>> {
    let limit = Duration::from_secs(5);
    let csv = run_bounded(
        "nvidia-smi",
        &[
            "--query-gpu=index,name,memory.total,memory.free,driver_version",
            "--format=csv,noheader,nounits",
        ],
        limit,
    )?;
    let cuda = run_bounded("nvidia-smi", &[], limit).and_then(|s| cuda_version(&s));
    Some(parse_nvidia_smi_csv(&csv, cuda.as_deref()))
}

/// Parses `index, name, memory.total [MiB], memory.free [MiB], driver_version` lines.
fn parse_nvidia_smi_csv(csv: &str, cuda: Option<&str>) -> Vec<Gpu> {
    let mib = |s: &str| s.trim().parse::<u64>().ok().map(|m| m << 20);
    csv.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name, total, free, driver] = f.as_slice() else {
                return None;
            };
            Some(Gpu {
                index: index.parse().ok()?,
                name: (*name).to_owned(),
                vram_total_bytes: mib(total),
                vram_free_bytes: mib(free),
                driver_version: Some((*driver).to_owned()).filter(|d| !d.is_empty()),
                cuda_version: cuda.map(str::to_owned),
            })
        })
        .collect()
}

/// `CUDA Version: 12.4` from `nvidia-smi`'s banner.
fn cuda_version(banner: &str) -> Option<String> {
    let rest = banner.split("CUDA Version:").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

fn proc_nvidia() -> Vec<Gpu> {
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|v| {
            v.split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
                .map(str::to_owned)
        });
    let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut entries: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    entries
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let info = std::fs::read_to_string(p.join("information")).unwrap_or_default();
            let name = info
                .lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_owned()))
                .unwrap_or_else(|| "NVIDIA GPU".into());
            Gpu {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                name,
                driver_version: driver.clone(),
                ..Gpu::default()
            }
        })
        .collect()
}

/// A span asked for does not fit the memory there is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{blocks} blocks need {} MiB of weights + {} MiB of KV cache = {} MiB, but only {} MiB \
     of {where_} is available; serve fewer blocks (--blocks / --span-len), a smaller dtype, \
     or a smaller --cache-budget-mib",
    weights_bytes >> 20, cache_bytes >> 20, (weights_bytes + cache_bytes) >> 20,
    available_bytes >> 20
)]
pub struct DoesNotFit {
    pub blocks: u32,
    pub weights_bytes: u64,
    pub cache_bytes: u64,
    pub available_bytes: u64,
    /// "RAM" or "VRAM".
    pub where_: &'static str,
}

/// How a span's weights are held, for sizing: a compute dtype, optionally quantized on
/// load, or a file's own bytes per block (a GGUF file is already quantized).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanFormat {
    pub dtype: DType,
    pub quantize: Option<Quantization>,
    /// Measured bytes per block, overriding the estimate from the config.
    pub block_bytes: Option<u64>,
}

impl From<DType> for SpanFormat {
    fn from(dtype: DType) -> Self {
        Self {
            dtype,
            quantize: None,
            block_bytes: None,
        }
    }
}

impl SpanFormat {
    /// The format a node loads `files` in: GGUF blocks as stored, else `dtype` quantized
    /// to `quantize`.
    pub fn of(files: &ModelFiles, dtype: DType, quantize: Option<Quantization>) -> Self {
        Self {
            dtype,
            quantize,
            block_bytes: files.gguf_block_bytes(),
        }
    }

    /// Bytes of one block of `cfg`.
    pub fn block_bytes(&self, cfg: &LlamaConfig) -> u64 {
        match (self.block_bytes, self.quantize) {
            (Some(b), _) => b,
            (None, Some(q)) => q.block_bytes(cfg, self.dtype),
            (None, None) => {
                (cfg.block_params() as u64).saturating_mul(self.dtype.size_in_bytes() as u64)
            }
        }
    }
}

/// Bytes of weights `blocks` blocks of `cfg` take in `format` (a dtype, or quantized).
pub fn span_weight_bytes(cfg: &LlamaConfig, blocks: u32, format: impl Into<SpanFormat>) -> u64 {
    format
        .into()
        .block_bytes(cfg)
        .saturating_mul(u64::from(blocks))
}

/// Bytes one session of `max_len` tokens takes in the KV cache of `blocks` blocks.
pub fn session_cache_bytes(cfg: &LlamaConfig, blocks: u32, max_len: u32, dtype: DType) -> u64 {
    SpanCache::bytes_for(cfg, blocks as usize, max_len as usize, dtype) as u64
}

/// Checks that `blocks` blocks plus a KV-cache budget of `cache_budget_bytes` fit in
/// `available_bytes`. The cache budget is the margin: it is what sessions may take.
pub fn check_fit(
    cfg: &LlamaConfig,
    blocks: u32,
    format: impl Into<SpanFormat>,
    cache_budget_bytes: u64,
    available_bytes: u64,
    where_: &'static str,
) -> Result<(), DoesNotFit> {
    let weights_bytes = span_weight_bytes(cfg, blocks, format);
    if weights_bytes.saturating_add(cache_budget_bytes) > available_bytes {
        return Err(DoesNotFit {
            blocks,
            weights_bytes,
            cache_bytes: cache_budget_bytes,
            available_bytes,
            where_,
        });
    }
    Ok(())
}

/// The most blocks (at most `num_blocks`) that fit beside the cache budget; 0 if none.
pub fn max_blocks_that_fit(
    cfg: &LlamaConfig,
    format: impl Into<SpanFormat>,
    cache_budget_bytes: u64,
    available_bytes: u64,
) -> u32 {
    let per_block = span_weight_bytes(cfg, 1, format).max(1);
    let room = available_bytes.saturating_sub(cache_budget_bytes);
    u32::try_from(room / per_block)
        .unwrap_or(u32::MAX)
        .min(cfg.num_blocks())
}

/// How big a span a node takes, and the numbers behind it (`register` prints them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sizing {
    /// Blocks the node will serve.
    pub blocks: u32,
    /// Their weights.
    pub weights_bytes: u64,
    /// The KV-cache budget kept beside them.
    pub cache_bytes: u64,
    /// Memory available to them; `None` when it could not be read (nothing is checked).
    pub available_bytes: Option<u64>,
    /// The most blocks that would fit; `None` when memory is unknown.
    pub max_blocks: Option<u32>,
    /// "RAM" or "VRAM".
    pub where_: &'static str,
}

/// Sizes a node's span. Asked for a span (`asked`) or a length (`span_len`), it must fit
/// or the answer is [`DoesNotFit`] with the numbers; asked for neither, the node takes as
/// many blocks as fit, at most the whole model, and refuses only when not one block fits.
pub fn size_span(
    cfg: &LlamaConfig,
    asked: Option<BlockRange>,
    span_len: Option<u32>,
    format: impl Into<SpanFormat>,
    cache_budget_bytes: u64,
    available_bytes: Option<u64>,
    where_: &'static str,
) -> Result<Sizing, DoesNotFit> {
    let format = format.into();
    let num_blocks = cfg.num_blocks();
    let max_blocks =
        available_bytes.map(|a| max_blocks_that_fit(cfg, format, cache_budget_bytes, a));
    let blocks = match (asked, span_len, max_blocks) {
        (Some(span), _, _) => span.len(),
        (None, Some(len), _) => len.clamp(1, num_blocks.max(1)),
        (None, None, Some(fit)) => fit.clamp(1, num_blocks.max(1)),
        (None, None, None) => num_blocks,
    };
    if let Some(available) = available_bytes {
        check_fit(cfg, blocks, format, cache_budget_bytes, available, where_)?;
    }
    Ok(Sizing {
        blocks,
        weights_bytes: span_weight_bytes(cfg, blocks, format),
        cache_bytes: cache_budget_bytes,
        available_bytes,
        max_blocks,
        where_,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny;

    #[test]
    fn probe_answers_and_serializes() {
        let p = probe(&std::env::temp_dir());
        assert!(p.cpu.cores >= 1);
        let json = serde_json::to_string(&p).unwrap();
        let back: Probe = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        if cfg!(target_os = "linux") {
            assert!(p.memory.total_bytes.unwrap_or(0) > 0);
            assert!(p.disk.is_some());
        }
        if p.gpus.is_empty() {
            assert!(p.gpu_note.starts_with("no GPU"), "{}", p.gpu_note);
        }
    }

    #[test]
    fn parses_nvidia_smi_output() {
        let csv = "0, NVIDIA H100 80GB HBM3, 81559, 80000, 550.54.15\n1, bad line\n";
        let gpus = parse_nvidia_smi_csv(csv, Some("12.4"));
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].vram_total_bytes, Some(81559 << 20));
        assert_eq!(gpus[0].driver_version.as_deref(), Some("550.54.15"));
        let banner =
            "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |";
        assert_eq!(cuda_version(banner).as_deref(), Some("12.4"));
    }

    #[cfg(unix)]
    #[test]
    fn a_command_past_its_limit_is_killed_not_waited_for() {
        let t = std::time::Instant::now();
        assert_eq!(
            run_bounded("sleep", &["5"], Duration::from_millis(100)),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(
            run_bounded("echo", &["hi"], Duration::from_secs(5)).as_deref(),
            Some("hi\n")
        );
        assert_eq!(
            run_bounded("mesh-no-such-command", &[], Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn a_span_that_does_not_fit_is_refused_with_the_numbers() {
        let cfg = tiny::config();
        let one = span_weight_bytes(&cfg, 1, DType::F32);
        assert!(one > 0);
        let all = cfg.num_blocks();
        assert!(check_fit(&cfg, all, DType::F32, 1 << 20, one * 100 + (1 << 20), "RAM").is_ok());
        let err = check_fit(&cfg, all, DType::F32, 1 << 20, one, "RAM").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("8 blocks") && msg.contains("RAM"), "{msg}");
        assert_eq!(max_blocks_that_fit(&cfg, DType::F32, 0, one * 3), 3);
        assert_eq!(max_blocks_that_fit(&cfg, DType::F32, 0, u64::MAX), all);

        // size_span: asked spans and lengths must fit; otherwise take what fits.
        let budget = 1 << 20;
        let room = Some(one * 3 + budget);
        let size =
            |asked, len, avail| size_span(&cfg, asked, len, DType::F32, budget, avail, "RAM");
        let s = size(None, None, room).unwrap();
        assert_eq!((s.blocks, s.max_blocks), (3, Some(3)));
        assert_eq!(s.weights_bytes, one * 3);
        assert_eq!(
            size(Some(BlockRange::new(0, 2)), None, room)
                .unwrap()
                .blocks,
            2
        );
        let err = size(Some(BlockRange::new(0, 4)), None, room).unwrap_err();
        assert_eq!((err.blocks, err.available_bytes), (4, one * 3 + budget));
        assert_eq!(size(None, Some(5), room).unwrap_err().blocks, 5);
        assert_eq!(size(None, None, Some(one)).unwrap_err().blocks, 1);
        assert_eq!(size(None, None, None).unwrap().blocks, all);
        assert_eq!(size(None, Some(99), None).unwrap().blocks, all);
    }

    #[test]
    fn capability_is_bounded() {
        let gpu = Gpu {
            name: format!("{}\u{7}", "é".repeat(40)),
            vram_total_bytes: Some(80 << 30),
            ..Gpu::default()
        };
        let p = Probe {
            cpu: Cpu {
                model: "x".into(),
                cores: 16,
            },
            memory: Memory {
                total_bytes: Some(64 << 30),
                available_bytes: None,
            },
            gpus: vec![gpu; 20],
            ..Probe::default()
        };
        let c = p.capability();
        assert!(c.is_valid());
        assert_eq!(c.gpus.len(), Capability::MAX_GPUS);
        assert_eq!(c.gpus[0].name, "é".repeat(32));
        assert_eq!(c.gpus[0].vram_bytes, 80 << 30);
        assert_eq!((c.cpu_cores, c.ram_bytes), (16, 64 << 30));
        let here = capability();
        assert!(here.is_valid() && here.cpu_cores >= 1);
    }

    #[test]
    fn q4k_fits_about_three_and_a_half_times_the_blocks_of_f16() {
        // A Llama-3-8B-shaped config: 4096 wide, 14336 MLP, 8 kv heads.
        let cfg = LlamaConfig::from_json(
            r#"{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 1000, "num_attention_heads": 32, "num_key_value_heads": 8}"#,
        )
        .unwrap();
        let q4k = SpanFormat {
            quantize: Some(Quantization::Q4K),
            ..SpanFormat::from(DType::F16)
        };
        let room = 40 * span_weight_bytes(&cfg, 1, DType::F16);
        let f16_blocks = max_blocks_that_fit(&cfg, DType::F16, 0, room);
        let q4k_blocks = max_blocks_that_fit(&cfg, q4k, 0, room);
        assert_eq!(f16_blocks, 40);
        assert_eq!(
            q4k_blocks, 142,
            "2 / 0.5625 bytes per weight, less the f16 norms"
        );
    }
}
