//! Gossip heartbeats: what a server publishes every interval on its model's topic, how every
//! received heartbeat is validated, and the table of live servers built from them.
//!
//! Topic: `mesh/hb/1/<model>` ([`topic`]). A heartbeat is rejected (and counted) when it is
//! oversized, undecodable, for another model than its topic, signed by another peer than the
//! one it names, has an impossible span, bad fields, or a timestamp too old or too far in the
//! future. A table entry not refreshed for 3 of the sender's intervals is dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::gossipsub::{IdentTopic, TopicHash};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::dht::{check_addrs, check_model_span, RecordReject};
use crate::types::{BlockRange, Capability, GpuLive, ModelId, ServerInfo, ServerLoad};
use crate::wire;

/// Prefix of heartbeat topics: `mesh/hb/1/<model>`.
pub const TOPIC_PREFIX: &str = "mesh/hb/1/";
/// Largest accepted heartbeat, in bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 4096;
/// Longest accepted version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Shortest and longest heartbeat interval a sender may declare.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(600);
/// Most live servers kept per model; heartbeats from more new servers are ignored.
pub const MAX_SERVERS_PER_MODEL: usize = 4096;
/// Entries are dropped after this many silent intervals.
pub const MISSED_INTERVALS: u32 = 3;

/// The gossipsub topic carrying heartbeats of `model`.
pub fn topic(model: &ModelId) -> IdentTopic {
    IdentTopic::new(format!("{TOPIC_PREFIX}{model}"))
}

/// The model a heartbeat topic is about, if `hash` is one of mesh's topics.
pub fn model_of_topic(hash: &TopicHash) -> Option<ModelId> {
    let model = ModelId::new(hash.as_str().strip_prefix(TOPIC_PREFIX)?);
    model.is_valid().then_some(model)
}

/// One heartbeat on the wire (wire-encoded, at most [`MAX_HEARTBEAT_BYTES`]).
///
/// Extend it only by appending fields at the end: receivers skip bytes after the fields
/// they know, so older peers keep accepting newer heartbeats (the gossipsub signature
/// covers every byte, so nobody on the way can append).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's peer id bytes; must equal the gossipsub message's signed source.
    pub peer_id: Vec<u8>,
    /// Sender's addresses as multiaddr bytes, at most 16.
    pub addrs: Vec<Vec<u8>>,
    pub model: String,
    pub span_start: u32,
    pub span_end: u32,
    pub num_blocks: u32,
    pub free_memory_bytes: u64,
    /// Tokens per second per block.
    pub throughput_tps: f32,
    pub active_sessions: u32,
    pub load: f32,
    /// Micro-units per token.
    pub price_per_token: u64,
    /// Software version of the sender.
    pub version: String,
    /// Sender's heartbeat interval in ms.
    pub interval_ms: u32,
    /// Sender's clock at publication, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// True on the last heartbeat of a server leaving cleanly: drop it at once.
    pub leaving: bool,
    /// The sender's hardware: cores, RAM, GPUs (bounded, [`Capability::is_valid`]).
    pub capability: Capability,
    /// The sender's GPUs now: memory used, free and total and utilisation, read again for
    /// every heartbeat (bounded, [`GpuLive::list_is_valid`]). Appended after `capability`:
    /// heartbeats from senders before it end there and are read with an empty list.
    pub gpu_live: Vec<GpuLive>,
    /// How the sender's span is stored: empty for full precision, else `q8_0`, `q4k`,
    /// `gguf:<types>` (bounded, [`crate::types::quantization_is_valid`]). Appended after
    /// `gpu_live`: older heartbeats read as full precision.
    pub quantization: String,
}

/// Why a heartbeat was rejected; each has its own counter in [`GossipStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Larger than [`MAX_HEARTBEAT_BYTES`].
    Oversized,
    /// Not a wire-encoded [`Heartbeat`].
    Undecodable,
    /// The message is on a non-mesh topic, or names another model than its topic.
    WrongModel,
    /// Unsigned, or the signer is not the peer the heartbeat names.
    Spoofed,
    /// The span is empty or does not fit the model's block count.
    BadSpan,
    /// Some other field is out of range (addresses, numbers, version, interval, hardware,
    /// GPU readings).
    Malformed,
    /// Timestamp older than the allowed clock skew.
    Stale,
    /// Timestamp further in the future than the allowed clock skew.
    Future,
}

/// Counters of gossip validation outcomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipStats {
    pub accepted: u64,
    pub oversized: u64,
    pub undecodable: u64,
    pub wrong_model: u64,
    pub spoofed: u64,
    pub bad_span: u64,
    pub malformed: u64,
    pub stale: u64,
    pub future: u64,
}

impl GossipStats {
    /// Counts one outcome.
    pub fn record(&mut self, outcome: Result<(), Reject>) {
        let c = match outcome {
            Ok(()) => &mut self.accepted,
            Err(Reject::Oversized) => &mut self.oversized,
            Err(Reject::Undecodable) => &mut self.undecodable,
            Err(Reject::WrongModel) => &mut self.wrong_model,
            Err(Reject::Spoofed) => &mut self.spoofed,
            Err(Reject::BadSpan) => &mut self.bad_span,
            Err(Reject::Malformed) => &mut self.malformed,
            Err(Reject::Stale) => &mut self.stale,
            Err(Reject::Future) => &mut self.future,
        };
        *c = c.saturating_add(1);
    }

    /// All rejections together.
    pub fn rejected(&self) -> u64 {
        self.oversized
            + self.undecodable
            + self.wrong_model
            + self.spoofed
            + self.bad_span
            + self.malformed
            + self.stale
            + self.future
    }
}

/// A validated heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Valid {
    pub info: ServerInfo,
    pub leaving: bool,
}

/// Validates the raw bytes of a gossip message received on `topic` whose signed source is
/// `source`. `now_ms` is the local clock; `max_skew` bounds how old or early it may be.
pub fn validate(
    data: &[u8],
    topic: &TopicHash,
    source: Option<PeerId>,
    now_ms: u64,
    max_skew: Duration,
) -> Result<Valid, Reject> {
    if data.len() > MAX_HEARTBEAT_BYTES {
        return Err(Reject::Oversized);
    }
    let topic_model = model_of_topic(topic).ok_or(Reject::WrongModel)?;
    let hb = decode(data)?;
    if hb.model != topic_model.as_str() {
        return Err(Reject::WrongModel);
    }
    let peer_id = PeerId::from_bytes(&hb.peer_id).map_err(|_| Reject::Malformed)?;
    if source != Some(peer_id) {
        return Err(Reject::Spoofed);
    }
    match check_model_span(&hb.model, hb.span_start, hb.span_end, hb.num_blocks) {
        Ok(()) => {}
        Err(RecordReject::Invalid("span")) => return Err(Reject::BadSpan),
        Err(_) => return Err(Reject::Malformed),
    }
    let addrs = check_addrs(&hb.addrs).map_err(|_| Reject::Malformed)?;
    let finite_non_negative = |x: f32| x.is_finite() && x >= 0.0;
    let interval = Duration::from_millis(u64::from(hb.interval_ms));
    if !finite_non_negative(hb.throughput_tps)
        || !finite_non_negative(hb.load)
        || hb.version.len() > MAX_VERSION_LEN
        || !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval)
        || !hb.capability.is_valid()
        || !GpuLive::list_is_valid(&hb.gpu_live)
        || !crate::types::quantization_is_valid(&hb.quantization)
    {
        return Err(Reject::Malformed);
    }
    let skew = max_skew.as_millis() as u64;
    if hb.timestamp_ms.saturating_add(skew) < now_ms {
        return Err(Reject::Stale);
    }
    if hb.timestamp_ms > now_ms.saturating_add(skew) {
        return Err(Reject::Future);
    }
    Ok(Valid {
        info: ServerInfo {
            peer_id,
            addrs,
            model: topic_model,
            span: BlockRange::new(hb.span_start, hb.span_end),
            num_blocks: hb.num_blocks,
            load: ServerLoad {
                free_memory_bytes: hb.free_memory_bytes,
                throughput_tps: hb.throughput_tps,
                active_sessions: hb.active_sessions,
                load: hb.load,
            },
            price_per_token: hb.price_per_token,
            version: hb.version,
            timestamp_ms: hb.timestamp_ms,
            interval,
            capability: hb.capability,
            gpu_live: hb.gpu_live,
            quantization: hb.quantization,
        },
        leaving: hb.leaving,
    })
}

/// Decodes a heartbeat, skipping fields a newer sender appended (heartbeats grow without
/// splitting the mesh), and reading one from an older sender too: those end right before
/// `quantization`, or right after `capability` (before `gpu_live`), which is a heartbeat
/// with those fields empty less the one byte that encodes each. Only those exact ends are
/// accepted; anything else cut short is undecodable.
fn decode(data: &[u8]) -> Result<Heartbeat, Reject> {
    if let Ok((hb, _)) = wire::decode_extensible::<Heartbeat>(data, MAX_HEARTBEAT_BYTES) {
        return Ok(hb);
    }
    for missing in 1..=2 {
        let mut padded = Vec::with_capacity(data.len() + missing);
        padded.extend_from_slice(data);
        padded.extend(std::iter::repeat_n(0, missing));
        // The added zeros were read as the missing fields, empty, and were the last bytes:
        // `data` ended exactly where an older sender's heartbeat does.
        if let Ok((hb, 0)) =
            wire::decode_extensible::<Heartbeat>(&padded, MAX_HEARTBEAT_BYTES + missing)
        {
            if hb.quantization.is_empty() && (missing == 1 || hb.gpu_live.is_empty()) {
                return Ok(hb);
            }
        }
    }
    Err(Reject::Undecodable)
}

/// What changed in the table after an update.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A server not in the table before (boxed: the other variants are small).
    Up(Box<ServerInfo>),
    /// A server known before (its entry was refreshed).
    Refreshed,
    /// A server was removed (leaving heartbeat).
    Down(PeerId, ModelId),
    /// Nothing changed (unknown server leaving, or the table is full).
    None,
}

struct Entry {
    info: ServerInfo,
    expires: Instant,
}

/// The live servers this peer has heard, per model.
#[derive(Default)]
pub struct LiveTable {
    models: HashMap<ModelId, HashMap<PeerId, Entry>>,
}

impl LiveTable {
    /// Applies a validated heartbeat heard at `now`.
    pub fn apply(&mut self, valid: Valid, now: Instant) -> Change {
        let model = valid.info.model.clone();
        let peer = valid.info.peer_id;
        let servers = self.models.entry(model.clone()).or_default();
        if valid.leaving {
            return match servers.remove(&peer) {
                Some(_) => Change::Down(peer, model),
                None => Change::None,
            };
        }
        let expires = now + valid.info.interval * MISSED_INTERVALS;
        let full = servers.len() >= MAX_SERVERS_PER_MODEL;
        match servers.get_mut(&peer) {
            Some(entry) => {
                // Gossip may reorder: never replace a newer heartbeat with an older one.
                if valid.info.timestamp_ms >= entry.info.timestamp_ms {
                    entry.info = valid.info;
                    entry.expires = expires;
                }
                Change::Refreshed
            }
            None if full => Change::None,
            None => {
                servers.insert(
                    peer,
                    Entry {
                        info: valid.info.clone(),
                        expires,
                    },
                );
                Change::Up(Box::new(valid.info))
            }
        }
    }

    /// Removes and returns entries unheard for [`MISSED_INTERVALS`] intervals.
    pub fn expire(&mut self, now: Instant) -> Vec<(PeerId, ModelId)> {
        let mut gone = Vec::new();
        for (model, servers) in &mut self.models {
            servers.retain(|peer, e| {
                let keep = e.expires > now;
                if !keep {
                    gone.push((*peer, model.clone()));
                }
                keep
            });
        }
        self.models.retain(|_, s| !s.is_empty());
        gone
    }

    /// The live servers of `model`, ordered by span start then peer id.
    pub fn servers(&self, model: &ModelId) -> Vec<ServerInfo> {
        let mut out: Vec<ServerInfo> = self
            .models
            .get(model)
            .map(|s| s.values().map(|e| e.info.clone()).collect())
            .unwrap_or_default();
        out.sort_by_key(|a| (a.span, a.peer_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const SKEW: Duration = Duration::from_secs(60);

    fn hb(peer: PeerId) -> Heartbeat {
        Heartbeat {
            peer_id: peer.to_bytes(),
            addrs: vec!["/ip4/127.0.0.1/tcp/1"
                .parse::<libp2p::Multiaddr>()
                .unwrap()
                .to_vec()],
            model: "tiny".into(),
            span_start: 0,
            span_end: 4,
            num_blocks: 8,
            free_memory_bytes: 1 << 30,
            throughput_tps: 12.5,
            active_sessions: 1,
            load: 0.1,
            price_per_token: 0,
            version: "0.1.0".into(),
            interval_ms: 1000,
            timestamp_ms: NOW,
            leaving: false,
            capability: Capability {
                cpu_cores: 8,
                ram_bytes: 32 << 30,
                gpus: vec![crate::types::GpuSummary {
                    name: "NVIDIA A10".into(),
                    vram_bytes: 24 << 30,
                }],
            },
            gpu_live: vec![GPU],
            quantization: String::new(),
        }
    }

    const GPU: GpuLive = GpuLive {
        index: 0,
        memory_used_bytes: 20 << 30,
        memory_free_bytes: 4 << 30,
        memory_total_bytes: 24 << 30,
        utilization_percent: Some(87),
    };

    fn check(h: &Heartbeat, source: PeerId) -> Result<Valid, Reject> {
        let t = topic(&ModelId::new("tiny")).hash();
        validate(&wire::encode(h).unwrap(), &t, Some(source), NOW, SKEW)
    }

    /// A later version's heartbeat: today's fields, then fields appended after them.
    #[derive(Serialize)]
    struct NewerHeartbeat {
        today: Heartbeat,
        region: String,
        busy_gpus: Vec<u32>,
    }

    #[test]
    fn heartbeats_with_appended_fields_are_read_by_older_peers() {
        let p = PeerId::random();
        let good = hb(p);
        let newer = NewerHeartbeat {
            today: good.clone(),
            region: "eu-west".into(),
            busy_gpus: vec![0, 3],
        };
        let t = topic(&ModelId::new("tiny")).hash();
        let bytes = wire::encode(&newer).unwrap();
        assert!(bytes.len() > wire::encode(&good).unwrap().len());
        let v = validate(&bytes, &t, Some(p), NOW, SKEW).unwrap();
        assert_eq!(v.info, check(&good, p).unwrap().info);
        // Appending never lifts the size bound.
        let huge = NewerHeartbeat {
            region: "x".repeat(MAX_HEARTBEAT_BYTES),
            ..newer
        };
        let bytes = wire::encode(&huge).unwrap();
        assert_eq!(
            validate(&bytes, &t, Some(p), NOW, SKEW),
            Err(Reject::Oversized)
        );
    }

    #[test]
    fn heartbeats_carry_the_quantization_bounded() {
        let p = PeerId::random();
        let mut h = hb(p);
        h.quantization = "gguf:q4k+q6k".into();
        assert_eq!(check(&h, p).unwrap().info.quantization, "gguf:q4k+q6k");
        h.quantization = "q".repeat(crate::types::MAX_QUANTIZATION_LEN + 1);
        assert_eq!(check(&h, p), Err(Reject::Malformed));
        h.quantization = "q4 k".into();
        assert_eq!(check(&h, p), Err(Reject::Malformed));
    }

    #[test]
    fn heartbeats_carry_live_gpu_figures() {
        let p = PeerId::random();
        let mut h = hb(p);
        let bytes = wire::encode(&h).unwrap();
        let back: Heartbeat = wire::decode(&bytes, MAX_HEARTBEAT_BYTES).unwrap();
        assert_eq!(back, h);
        assert_eq!(check(&h, p).unwrap().info.gpu_live, vec![GPU]);

        // The largest heartbeat with the most GPUs and readings stays well inside the bound.
        let max = GpuLive {
            index: u32::MAX,
            memory_used_bytes: u64::MAX,
            memory_free_bytes: u64::MAX,
            memory_total_bytes: u64::MAX,
            utilization_percent: Some(100),
        };
        let name = "n".repeat(Capability::MAX_GPU_NAME);
        h.capability.gpus = vec![
            crate::types::GpuSummary {
                name,
                vram_bytes: u64::MAX
            };
            Capability::MAX_GPUS
        ];
        h.gpu_live = vec![max; Capability::MAX_GPUS];
        let len = wire::encode(&h).unwrap().len();
        assert!(len < MAX_HEARTBEAT_BYTES / 2, "{len} bytes");
        assert_eq!(
            check(&h, p).unwrap().info.gpu_live.len(),
            Capability::MAX_GPUS
        );

        // No GPU: no readings, nothing else changes.
        h.gpu_live.clear();
        assert!(check(&h, p).unwrap().info.gpu_live.is_empty());
    }

    #[test]
    fn heartbeats_from_before_gpu_live_are_still_read() {
        let p = PeerId::random();
        let mut h = hb(p);
        h.gpu_live.clear();
        // An older sender's bytes: everything up to `capability`, without the list (nor
        // the quantization appended after it).
        let full = wire::encode(&h).unwrap();
        assert_eq!(full[full.len() - 2..], [0, 0]);
        let older = &full[..full.len() - 2];
        let t = topic(&ModelId::new("tiny")).hash();
        let v = validate(older, &t, Some(p), NOW, SKEW).unwrap();
        assert_eq!(v.info, check(&h, p).unwrap().info);
        assert!(v.info.gpu_live.is_empty());
        // A sender with readings but from before `quantization` reads as full precision.
        let with = wire::encode(&hb(p)).unwrap();
        let v = validate(&with[..with.len() - 1], &t, Some(p), NOW, SKEW).unwrap();
        assert_eq!(v.info, check(&hb(p), p).unwrap().info);
        // Cut anywhere else, or inside the readings, it is undecodable.
        for cut in [older.len() - 1, with.len() - 2] {
            assert_eq!(
                validate(&with[..cut], &t, Some(p), NOW, SKEW),
                Err(Reject::Undecodable),
                "cut at {cut} of {}",
                with.len()
            );
        }
    }

    #[test]
    fn accepts_a_good_heartbeat_and_rejects_each_kind_of_bad_one() {
        let p = PeerId::random();
        let good = hb(p);
        let v = check(&good, p).unwrap();
        assert_eq!(v.info.span, BlockRange::new(0, 4));
        assert_eq!(v.info.capability, good.capability);

        let t = topic(&ModelId::new("tiny")).hash();
        let bytes = wire::encode(&good).unwrap();
        let other_topic = topic(&ModelId::new("other")).hash();
        assert_eq!(
            validate(&bytes, &other_topic, Some(p), NOW, SKEW),
            Err(Reject::WrongModel)
        );
        assert_eq!(
            validate(&bytes, &TopicHash::from_raw("junk"), Some(p), NOW, SKEW),
            Err(Reject::WrongModel)
        );
        assert_eq!(check(&good, PeerId::random()), Err(Reject::Spoofed));
        assert_eq!(validate(&bytes, &t, None, NOW, SKEW), Err(Reject::Spoofed));
        assert_eq!(
            validate(&[7u8; 5000], &t, Some(p), NOW, SKEW),
            Err(Reject::Oversized)
        );
        assert_eq!(
            validate(b"\x01\xff\xff", &t, Some(p), NOW, SKEW),
            Err(Reject::Undecodable)
        );
        let bad = |f: &dyn Fn(&mut Heartbeat)| {
            let mut h = hb(p);
            f(&mut h);
            check(&h, p)
        };
        assert_eq!(bad(&|h| h.span_end = 9), Err(Reject::BadSpan));
        assert_eq!(bad(&|h| h.span_start = 4), Err(Reject::BadSpan));
        assert_eq!(bad(&|h| h.num_blocks = 0), Err(Reject::BadSpan));
        assert_eq!(bad(&|h| h.model = "other".into()), Err(Reject::WrongModel));
        assert_eq!(
            bad(&|h| h.throughput_tps = f32::NAN),
            Err(Reject::Malformed)
        );
        assert_eq!(bad(&|h| h.load = -1.0), Err(Reject::Malformed));
        assert_eq!(bad(&|h| h.interval_ms = 0), Err(Reject::Malformed));
        assert_eq!(
            bad(&|h| h.addrs = vec![vec![0xff; 3]]),
            Err(Reject::Malformed)
        );
        assert_eq!(bad(&|h| h.addrs = vec![vec![]; 17]), Err(Reject::Malformed));
        assert_eq!(bad(&|h| h.version = "v".repeat(65)), Err(Reject::Malformed));
        assert_eq!(
            bad(&|h| h.capability.gpus = vec![h.capability.gpus[0].clone(); 17]),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.capability.gpus[0].name = "n".repeat(65)),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.capability.gpus[0].name = "A10\r\n".into()),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.gpu_live[0].utilization_percent = Some(101)),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.gpu_live[0].memory_used_bytes = (24 << 30) + 1),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.gpu_live[0].memory_free_bytes = u64::MAX),
            Err(Reject::Malformed)
        );
        assert_eq!(
            bad(&|h| h.gpu_live = vec![GPU; Capability::MAX_GPUS + 1]),
            Err(Reject::Malformed)
        );
        assert_eq!(bad(&|h| h.timestamp_ms = NOW - 61_000), Err(Reject::Stale));
        assert_eq!(bad(&|h| h.timestamp_ms = NOW + 61_000), Err(Reject::Future));
        // Big but under the gossip limit: the heartbeat limit catches it.
        assert_eq!(
            bad(&|h| h.version = "v".repeat(MAX_HEARTBEAT_BYTES)),
            Err(Reject::Oversized)
        );
    }

    #[test]
    fn table_adds_refreshes_expires_and_drops_leavers() {
        let mut table = LiveTable::default();
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let va = check(&hb(a), a).unwrap();
        assert!(matches!(table.apply(va.clone(), t0), Change::Up(_)));
        assert_eq!(table.apply(va, t0), Change::Refreshed);
        let vb = check(&hb(b), b).unwrap();
        assert!(matches!(table.apply(vb, t0), Change::Up(_)));
        let model = ModelId::new("tiny");
        assert_eq!(table.servers(&model).len(), 2);

        // b refreshes at 2 s; a does not: after 3 intervals only a is gone.
        let vb = check(&hb(b), b).unwrap();
        table.apply(vb, t0 + Duration::from_secs(2));
        assert!(table.expire(t0 + Duration::from_millis(2900)).is_empty());
        assert_eq!(
            table.expire(t0 + Duration::from_secs(3)),
            vec![(a, model.clone())]
        );
        assert_eq!(table.servers(&model).len(), 1);

        let mut leaving = hb(b);
        leaving.leaving = true;
        let v = check(&leaving, b).unwrap();
        assert_eq!(table.apply(v, t0), Change::Down(b, model.clone()));
        assert!(table.servers(&model).is_empty());
    }
}
