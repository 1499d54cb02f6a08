//! The shared vocabulary: names every layer of mesh uses for models, blocks and sessions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A model's name on the mesh, e.g. `tiny-llama-mesh` or `meta-llama/Llama-2-7b-hf`.
///
/// Peers serving the same `ModelId` must serve bit-compatible weights; the ledger also
/// records a hash of the config so a receipt names exactly what ran.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelId(pub String);

impl ModelId {
    /// Longest accepted model name; keeps DHT keys and gossip topics bounded.
    pub const MAX_LEN: usize = 128;

    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A name is valid when it is non-empty, bounded and printable without whitespace.
    pub fn is_valid(&self) -> bool {
        !self.0.is_empty()
            && self.0.len() <= Self::MAX_LEN
            && self.0.chars().all(|c| c.is_ascii_graphic())
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A half-open span of transformer blocks `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockRange {
    pub start: u32,
    pub end: u32,
}

impl BlockRange {
    pub fn new(start: u32, end: u32) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, block: u32) -> bool {
        self.start <= block && block < self.end
    }

    /// True when the span is non-empty and lies inside a model of `num_blocks` blocks.
    pub fn fits(&self, num_blocks: u32) -> bool {
        !self.is_empty() && self.end <= num_blocks
    }

    /// Split `num_blocks` into `parts` contiguous spans whose sizes differ by at most one.
    pub fn even_split(num_blocks: u32, parts: u32) -> Vec<BlockRange> {
        let parts = parts.clamp(1, num_blocks.max(1));
        let base = num_blocks / parts;
        let extra = num_blocks % parts;
        let mut start = 0;
        (0..parts)
            .map(|i| {
                let len = base + u32::from(i < extra);
                let span = BlockRange::new(start, start + len);
                start += len;
                span
            })
            .collect()
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// Identifies one client's inference session; chosen at random by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A server's self-reported load, carried in its heartbeats and updated by the node as it
/// serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerLoad {
    /// Free memory (VRAM on a GPU, RAM otherwise) for more sessions, in bytes.
    pub free_memory_bytes: u64,
    /// Measured throughput in tokens per second per block.
    pub throughput_tps: f32,
    /// Inference sessions open right now.
    pub active_sessions: u32,
    /// Busy fraction, `0.0` idle to `1.0` saturated (may exceed 1 when queueing).
    pub load: f32,
}

/// A server's hardware in a few bytes, carried in its heartbeats so clients and operators
/// see what a peer runs on (`mesh-client nodes`) without asking it. Self-reported: a hint
/// for people and routing, never proof.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Logical CPU cores; 0 = not reported.
    pub cpu_cores: u32,
    /// Total RAM in bytes; 0 = not reported.
    pub ram_bytes: u64,
    /// At most [`Capability::MAX_GPUS`]; empty = no GPU.
    pub gpus: Vec<GpuSummary>,
}

/// One GPU of a [`Capability`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSummary {
    /// e.g. `NVIDIA H100 80GB HBM3`; at most [`Capability::MAX_GPU_NAME`] bytes.
    pub name: String,
    /// Total VRAM in bytes; 0 = unknown.
    pub vram_bytes: u64,
}

impl Capability {
    /// Most GPUs a heartbeat may list (keeps heartbeats small: 16 GPUs are ~1.2 KB).
    pub const MAX_GPUS: usize = 16;
    /// Longest GPU name, in bytes.
    pub const MAX_GPU_NAME: usize = 64;

    /// Within the bounds, with printable names: what a receiver accepts.
    pub fn is_valid(&self) -> bool {
        self.gpus.len() <= Self::MAX_GPUS
            && self.gpus.iter().all(|g| {
                g.name.len() <= Self::MAX_GPU_NAME && !g.name.chars().any(char::is_control)
            })
    }
}

/// One GPU's memory and load now, as its driver reports it: sampled about once per
/// heartbeat ([`crate::probe::gpu_live`]) so heartbeats, `/healthz`, `/metrics`, the
/// dashboard and `mesh-node status` show the present rather than the start-up probe.
/// Self-reported in heartbeats, like [`Capability`]: a hint, never proof.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLive {
    /// The driver's index (`nvidia-smi`'s), the order of [`Capability::gpus`].
    pub index: u32,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    pub memory_total_bytes: u64,
    /// Percent of the driver's last sample period a kernel ran, 0..=100; `None` where the
    /// driver does not say (MIG slices, some older boards).
    pub utilization_percent: Option<u8>,
}

impl GpuLive {
    /// Possible figures: used and free each at most total, utilisation at most 100.
    pub fn is_valid(&self) -> bool {
        self.memory_used_bytes <= self.memory_total_bytes
            && self.memory_free_bytes <= self.memory_total_bytes
            && self.utilization_percent.is_none_or(|u| u <= 100)
    }

    /// What a receiver accepts: at most [`Capability::MAX_GPUS`] readings, each valid.
    pub fn list_is_valid(list: &[GpuLive]) -> bool {
        list.len() <= Capability::MAX_GPUS && list.iter().all(GpuLive::is_valid)
    }

    /// `5.0 GiB used of 24.0 GiB (19.0 GiB free), 63% utilisation`.
    pub fn usage(&self) -> String {
        format!(
            "{} used of {} ({} free), {}",
            gib(self.memory_used_bytes),
            gib(self.memory_total_bytes),
            gib(self.memory_free_bytes),
            self.utilization()
        )
    }

    /// `gpu0 19.0/24.0 GiB free, 63% utilisation`: one GPU in a line of several.
    pub fn short(&self) -> String {
        format!(
            "gpu{} {:.1}/{} free, {}",
            self.index,
            self.memory_free_bytes as f64 / f64::from(1u32 << 30),
            gib(self.memory_total_bytes),
            self.utilization()
        )
    }

    fn utilization(&self) -> String {
        self.utilization_percent
            .map_or_else(|| "utilisation n/a".into(), |u| format!("{u}% utilisation"))
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// `4 cores, 15.6 GiB RAM, no GPU` or `..., 2 x NVIDIA A10 (22.0 GiB)`.
impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cpu_cores == 0 && self.ram_bytes == 0 && self.gpus.is_empty() {
            return f.write_str("hardware not reported");
        }
        write!(f, "{} cores, {} RAM, ", self.cpu_cores, gib(self.ram_bytes))?;
        if self.gpus.is_empty() {
            return f.write_str("no GPU");
        }
        // Identical GPUs are listed once with a count.
        let mut groups: Vec<(&GpuSummary, usize)> = Vec::new();
        for g in &self.gpus {
            match groups.iter_mut().find(|(seen, _)| *seen == g) {
                Some((_, n)) => *n += 1,
                None => groups.push((g, 1)),
            }
        }
        for (i, (g, n)) in groups.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let count = if *n > 1 {
                format!("{n} x ")
            } else {
                String::new()
            };
            let vram = if g.vram_bytes > 0 {
                format!(" ({})", gib(g.vram_bytes))
            } else {
                String::new()
            };
            write!(f, "{sep}{count}{}{vram}", g.name)?;
        }
        Ok(())
    }
}

/// A live server of a model as one peer last heard it in a gossip heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerInfo {
    pub peer_id: libp2p::PeerId,
    /// Addresses the server announces (without the `/p2p/` suffix).
    pub addrs: Vec<libp2p::Multiaddr>,
    pub model: ModelId,
    /// The blocks it serves.
    pub span: BlockRange,
    /// How many blocks the whole model has.
    pub num_blocks: u32,
    pub load: ServerLoad,
    /// Price per token in micro-units (millionths of the ledger's unit); 0 = free.
    pub price_per_token: u64,
    /// The server's software version string.
    pub version: String,
    /// The server's clock when it sent the heartbeat, in ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The server's heartbeat interval; the entry is dropped after 3 silent intervals.
    pub interval: std::time::Duration,
    /// The server's hardware, as it reports it.
    pub capability: Capability,
    /// Its GPUs' memory and utilisation when it sent the heartbeat; empty without GPUs or
    /// from a server that predates the field.
    pub gpu_live: Vec<GpuLive>,
    /// How its span's weights are stored: empty for full precision, else `q8_0`, `q4k`
    /// or `gguf:<types>` ([`crate::model::SpanModel::quantization`]).
    pub quantization: String,
}

/// Longest accepted quantization label in heartbeats and records.
pub const MAX_QUANTIZATION_LEN: usize = 32;

/// Whether a quantization label from the network is short and printable.
pub fn quantization_is_valid(label: &str) -> bool {
    label.len() <= MAX_QUANTIZATION_LEN && label.chars().all(|c| c.is_ascii_graphic())
}

/// A server found in the DHT for a block: who it is, where to dial it, and its whole span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpan {
    pub peer_id: libp2p::PeerId,
    pub addrs: Vec<libp2p::Multiaddr>,
    pub model: ModelId,
    pub span: BlockRange,
    pub num_blocks: u32,
    /// Price per token in micro-units; 0 = free.
    pub price_per_token: u64,
    /// How its weights are stored; empty = full precision ([`ServerInfo::quantization`]).
    pub quantization: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_covers_all_blocks_contiguously() {
        for n in 1..20 {
            for parts in 1..6 {
                let spans = BlockRange::even_split(n, parts);
                assert_eq!(spans.first().map(|s| s.start), Some(0));
                assert_eq!(spans.last().map(|s| s.end), Some(n));
                for w in spans.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                assert!(spans.iter().all(|s| !s.is_empty()));
            }
        }
    }

    #[test]
    fn capability_bounds_and_summary() {
        let gpu = GpuSummary {
            name: "NVIDIA A10".into(),
            vram_bytes: 24 << 30,
        };
        let c = Capability {
            cpu_cores: 8,
            ram_bytes: 64 << 30,
            gpus: vec![gpu.clone(), gpu.clone()],
        };
        assert!(c.is_valid());
        assert_eq!(
            c.to_string(),
            "8 cores, 64.0 GiB RAM, 2 x NVIDIA A10 (24.0 GiB)"
        );
        let cpu_only = Capability {
            gpus: Vec::new(),
            ..c.clone()
        };
        assert_eq!(cpu_only.to_string(), "8 cores, 64.0 GiB RAM, no GPU");
        assert_eq!(Capability::default().to_string(), "hardware not reported");
        let many = Capability {
            gpus: vec![gpu.clone(); Capability::MAX_GPUS + 1],
            ..c.clone()
        };
        assert!(!many.is_valid());
        let long = Capability {
            gpus: vec![GpuSummary {
                name: "x".repeat(Capability::MAX_GPU_NAME + 1),
                vram_bytes: 0,
            }],
            ..c.clone()
        };
        assert!(!long.is_valid());
        let control = Capability {
            gpus: vec![GpuSummary {
                name: "A10\n\x1b[31m".into(),
                vram_bytes: 0,
            }],
            ..c
        };
        assert!(!control.is_valid());
    }

    #[test]
    fn gpu_live_bounds_and_summary() {
        let g = GpuLive {
            index: 1,
            memory_used_bytes: 2 << 30,
            memory_free_bytes: 22 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(37),
        };
        assert!(g.is_valid());
        assert_eq!(g.short(), "gpu1 22.0/24.0 GiB free, 37% utilisation");
        assert_eq!(
            g.usage(),
            "2.0 GiB used of 24.0 GiB (22.0 GiB free), 37% utilisation"
        );
        let unknown = GpuLive {
            utilization_percent: None,
            ..g
        };
        assert!(unknown.is_valid());
        assert!(unknown.short().ends_with("free, utilisation n/a"));
        let over = |f: &dyn Fn(&mut GpuLive)| {
            let mut x = g;
            f(&mut x);
            x.is_valid()
        };
        assert!(over(&|x| x.utilization_percent = Some(100)));
        assert!(!over(&|x| x.utilization_percent = Some(101)));
        assert!(!over(&|x| x.memory_used_bytes = x.memory_total_bytes + 1));
        assert!(!over(&|x| x.memory_free_bytes = x.memory_total_bytes + 1));
        assert!(GpuLive::list_is_valid(&[]));
        assert!(GpuLive::list_is_valid(&[g; Capability::MAX_GPUS]));
        assert!(!GpuLive::list_is_valid(&[g; Capability::MAX_GPUS + 1]));
    }

    #[test]
    fn model_id_validation() {
        assert!(ModelId::new("tiny-llama").is_valid());
        assert!(!ModelId::new("").is_valid());
        assert!(!ModelId::new("has space").is_valid());
        assert!(!ModelId::new("x".repeat(200)).is_valid());
    }
}
