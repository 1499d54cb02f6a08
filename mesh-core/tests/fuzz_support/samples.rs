//! Valid samples of everything the fuzzed decoders read, built with fixed keys and a fixed
//! clock so the seed corpora are reproducible.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use libp2p::kad::RecordKey;
use mesh_core::identity::Identity;
use mesh_core::ledger::settle::BATCH_FORMAT;
use mesh_core::ledger::{
    Attestation, Batch, BatchLine, ClientTally, ConfigHash, PayerTotal, Receipt, SignedReceipt,
    Terms,
};
use mesh_core::p2p::dht::{self, ServerRecord};
use mesh_core::p2p::heartbeat::Heartbeat;
use mesh_core::pipeline::{PushTarget, Refusal, SessionRequest, SessionResponse, StepInput};
use mesh_core::types::{Capability, GpuLive, GpuSummary};
use mesh_core::wire::{self, WireDType, WireTensor};
use mesh_core::{BlockRange, ModelId, SessionId};

/// The clock every sample and oracle uses (ms since the Unix epoch).
pub const NOW_MS: u64 = 1_700_000_000_000;
/// Heartbeat clock skew the oracle allows.
pub const SKEW: Duration = Duration::from_secs(60);
/// Largest frame the `read_frame` oracle accepts.
pub const FRAME_MAX: usize = 1 << 20;
/// The cargo-fuzz targets, in the order the docs list them.
pub const TARGETS: [&str; 5] = [
    "session_frames",
    "heartbeat",
    "dht_record",
    "receipt",
    "settlement_batch",
];

fn identity(seed: u8) -> &'static Identity {
    static IDS: OnceLock<[Identity; 3]> = OnceLock::new();
    let ids = IDS
        .get_or_init(|| [1u8, 2, 3].map(|s| Identity::from_secret([s; 32]).expect("ed25519 seed")));
    &ids[usize::from(seed)]
}

/// The server of every sample (heartbeat sender, record owner, receipt signer).
pub fn server() -> &'static Identity {
    identity(0)
}

/// The paying client of the samples.
pub fn client() -> &'static Identity {
    identity(1)
}

/// A second client, so batches have two payers.
pub fn client2() -> &'static Identity {
    identity(2)
}

pub fn model() -> ModelId {
    ModelId::new("tiny")
}

/// A `[1, 2, n]` hidden-state frame with `dtype` elements.
pub fn tensor(dtype: WireDType, n: u32) -> WireTensor {
    let size = match dtype {
        WireDType::F32 => 4,
        WireDType::F16 | WireDType::BF16 => 2,
    };
    WireTensor {
        dtype,
        shape: vec![1, 2, n],
        data: (0..2 * n as usize * size)
            .map(|i| (i * 37 % 251) as u8)
            .collect(),
    }
}

pub fn terms(client: &Identity, session: u8) -> Terms {
    Terms {
        session: SessionId([session; 16]),
        client: client.peer_id(),
        server: server().peer_id(),
        model: model(),
        config_hash: ConfigHash([1; 32]),
        span: BlockRange::new(2, 5),
        price_per_token: 10,
    }
}

/// A receipt for `prefill` + `decode` tokens, server-signed and (if `countersign`) agreed.
pub fn signed_receipt(
    client: &Identity,
    session: u8,
    prefill: u64,
    decode: u64,
    countersign: bool,
) -> SignedReceipt {
    let terms = terms(client, session);
    let receipt = Receipt::new(terms.clone(), prefill, decode, NOW_MS - 5_000, NOW_MS, 1)
        .expect("valid receipt");
    let mut signed = receipt.sign(&server().signing_key()).expect("server key");
    if countersign {
        let mut tally = ClientTally::new(terms);
        tally.record_positions(prefill);
        for _ in 0..decode {
            tally.record_positions(1);
        }
        signed
            .countersign(&client.signing_key(), &tally)
            .expect("tally covers the receipt");
    }
    signed
}

pub fn requests() -> Vec<SessionRequest> {
    let session = SessionId([7; 16]);
    vec![
        SessionRequest::Open {
            session,
            model: model(),
            span: BlockRange::new(2, 5),
            max_len: 64,
            attest: true,
        },
        SessionRequest::Forward {
            session,
            start_pos: 3,
            hidden: tensor(WireDType::F32, 4),
        },
        SessionRequest::Close { session },
        SessionRequest::Countersigned {
            receipt: Box::new(signed_receipt(client(), 7, 5, 3, true)),
        },
        SessionRequest::Rewind {
            session,
            to: 2,
            hidden: tensor(WireDType::F32, 3),
        },
        SessionRequest::Step {
            session,
            start_pos: 3,
            rewind: false,
            input: StepInput::Hidden(tensor(WireDType::F32, 4)),
            push_to: Some(PushTarget {
                peer: server().peer_id(),
                session: SessionId([8; 16]),
            }),
        },
        SessionRequest::Step {
            session,
            start_pos: 2,
            rewind: true,
            input: StepInput::PushedBy(client().peer_id()),
            push_to: None,
        },
        SessionRequest::Push {
            session,
            start_pos: 3,
            hidden: tensor(WireDType::BF16, 4),
        },
    ]
}

pub fn responses() -> Vec<SessionResponse> {
    let session = SessionId([7; 16]);
    let (input, output) = (tensor(WireDType::F32, 4), tensor(WireDType::F16, 4));
    let attestation = Attestation::sign(&server().signing_key(), &session, 3, &input, &output);
    vec![
        SessionResponse::Opened {
            session,
            span: BlockRange::new(2, 5),
            terms: Some(Box::new(terms(client(), 7))),
        },
        SessionResponse::Hidden {
            session,
            hidden: output,
            compute_micros: 1234,
            receipt: Some(Box::new(signed_receipt(client(), 7, 5, 0, false))),
            attestation: Some(attestation),
        },
        SessionResponse::Closed {
            session,
            receipt: Some(Box::new(signed_receipt(client(), 7, 5, 3, false))),
        },
        SessionResponse::Acknowledged,
        SessionResponse::Refused(Refusal::OverBudget {
            needed: 1 << 30,
            free: 1 << 20,
            budget: 1 << 31,
        }),
        SessionResponse::Refused(Refusal::BadRequest("bad frame".into())),
        SessionResponse::Refused(Refusal::NoPushedInput("no push came".into())),
    ]
}

pub fn heartbeat(leaving: bool) -> Heartbeat {
    Heartbeat {
        peer_id: server().peer_id().to_bytes(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001"
            .parse::<libp2p::Multiaddr>()
            .expect("multiaddr")
            .to_vec()],
        model: model().0,
        span_start: 2,
        span_end: 5,
        num_blocks: 8,
        free_memory_bytes: 1 << 30,
        throughput_tps: 12.5,
        active_sessions: 1,
        load: 0.25,
        price_per_token: 10,
        version: "0.1.0".into(),
        interval_ms: 1000,
        timestamp_ms: NOW_MS,
        leaving,
        capability: Capability {
            cpu_cores: 16,
            ram_bytes: 64 << 30,
            gpus: vec![GpuSummary {
                name: "NVIDIA A10".into(),
                vram_bytes: 24 << 30,
            }],
        },
        gpu_live: vec![GpuLive {
            index: 0,
            memory_used_bytes: 20 << 30,
            memory_free_bytes: 4 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(87),
        }],
        quantization: "q8_0".into(),
    }
}

/// [`heartbeat`] as a sender from before `gpu_live` wrote it: the bytes end after
/// `capability` (a heartbeat with no readings and full precision, less the one byte of
/// the empty list and the one of the empty quantization).
pub fn older_heartbeat(leaving: bool) -> Vec<u8> {
    let mut h = heartbeat(leaving);
    h.gpu_live.clear();
    h.quantization.clear();
    let mut bytes = enc(&h);
    assert_eq!(bytes.pop(), Some(0), "an empty string is one zero byte");
    assert_eq!(bytes.pop(), Some(0), "an empty list is one zero byte");
    bytes
}

/// [`heartbeat`] as a sender from before `quantization` wrote it: everything up to
/// `gpu_live`, readings included.
pub fn pre_quantization_heartbeat(leaving: bool) -> Vec<u8> {
    let mut h = heartbeat(leaving);
    h.quantization.clear();
    let mut bytes = enc(&h);
    assert_eq!(bytes.pop(), Some(0), "an empty string is one zero byte");
    bytes
}

pub fn server_record() -> ServerRecord {
    ServerRecord {
        peer_id: server().peer_id().to_bytes(),
        addrs: heartbeat(false).addrs,
        model: model().0,
        span_start: 2,
        span_end: 5,
        num_blocks: 8,
        price_per_token: 10,
        online: true,
        issued_ms: NOW_MS,
        expires_ms: NOW_MS + 60_000,
        quantization: "q4k".into(),
    }
}

pub fn record_key() -> RecordKey {
    dht::server_key(&server().peer_id())
}

pub fn signed_record() -> Vec<u8> {
    dht::sign_server_record(&server().keypair(), &server_record()).expect("signable")
}

/// A batch of three lines from two clients, one line partly settled before.
pub fn batch() -> Batch {
    let mut lines = vec![
        BatchLine {
            receipt: signed_receipt(client(), 7, 5, 3, true),
            already_settled: 0,
            due: 8 * 3 * 10,
        },
        BatchLine {
            receipt: signed_receipt(client(), 8, 4, 0, true),
            already_settled: 40,
            due: 4 * 3 * 10 - 40,
        },
        BatchLine {
            receipt: signed_receipt(client2(), 9, 2, 1, true),
            already_settled: 0,
            due: 3 * 3 * 10,
        },
    ];
    lines.sort_by_key(|l| l.receipt.receipt.terms.client.to_bytes());
    let mut payers: BTreeMap<Vec<u8>, PayerTotal> = BTreeMap::new();
    for l in &lines {
        let client = l.receipt.receipt.terms.client;
        let p = payers.entry(client.to_bytes()).or_insert(PayerTotal {
            client,
            lines: 0,
            due: 0,
        });
        p.lines += 1;
        p.due += l.due;
    }
    let total_due = lines.iter().map(|l| l.due).sum();
    Batch {
        format: BATCH_FORMAT.into(),
        payee: server().peer_id(),
        created_ms: NOW_MS,
        since_ms: 0,
        min_amount: 1,
        lines,
        payers: payers.into_values().collect(),
        total_due,
    }
}

/// A batch file's bytes, as `Batch::write` lays them out.
pub fn batch_json(batch: &Batch) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(batch).expect("json");
    json.push(b'\n');
    json
}

fn with_selector(selector: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(body);
    out
}

/// Bytes `write_frame` puts on a stream for `body`.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Valid inputs of `target`: the seed corpus, each accepted by its oracle.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "session_frames" => {
            let mut out: Vec<Vec<u8>> = Vec::new();
            out.extend(requests().iter().map(|r| with_selector(0, &enc(r))));
            out.extend(responses().iter().map(|r| with_selector(1, &enc(r))));
            out.push(with_selector(2, &framed(&enc(&requests()[1]))));
            for dtype in [WireDType::F32, WireDType::F16, WireDType::BF16] {
                out.push(with_selector(3, &enc(&tensor(dtype, 3))));
            }
            out
        }
        "heartbeat" => vec![
            enc(&heartbeat(false)),
            enc(&heartbeat(true)),
            older_heartbeat(false),
        ],
        "dht_record" => vec![
            with_selector(0, &signed_record()),
            with_selector(1, dht::block_key(&model(), 3).as_ref()),
            with_selector(1, record_key().as_ref()),
            with_selector(2, &enc(&server_record())),
        ],
        "receipt" => {
            let agreed = signed_receipt(client(), 7, 5, 3, true);
            vec![
                with_selector(0, &enc(&agreed)),
                with_selector(0, &enc(&signed_receipt(client(), 7, 5, 3, false))),
                with_selector(1, &serde_json::to_vec(&agreed).expect("json")),
                with_selector(2, &enc(&agreed.receipt)),
            ]
        }
        "settlement_batch" => vec![batch_json(&batch())],
        other => panic!("no fuzz target {other}"),
    }
}

/// `wire::encode` of a sample.
pub fn enc<T: serde::Serialize>(value: &T) -> Vec<u8> {
    wire::encode(value).expect("samples encode")
}
