//! A server whose ledger fails while it serves stops opening billed sessions (issue 14,
//! item 2): it used to log `receipt not recorded` for every receipt and keep working
//! unpaid. The failure is real: the ledger directory stops taking the store's writes
//! (its high-water mark, written after each new receipt, cannot be replaced).

use candle_core::{DType, Device, Tensor};
use libp2p::PeerId;
use mesh_core::identity::Identity;
use mesh_core::ledger::{Store, MARK_FILE};
use mesh_core::model::{tiny, ModelFiles, SpanModel};
use mesh_core::pipeline::{Billing, ServerLimits, SessionRequest, SessionResponse, SpanServer};
use mesh_core::wire::WireTensor;
use mesh_core::{BlockRange, ModelId, SessionId};

fn open(srv: &mut SpanServer, client: PeerId, session: SessionId) -> SessionResponse {
    let open = SessionRequest::Open {
        session,
        model: ModelId::new(tiny::TINY_MODEL_ID),
        span: srv.span().range(),
        max_len: 16,
        attest: true,
    };
    srv.handle(client, open, std::time::Instant::now())
}

/// Opens a session and runs a 3-position prompt through it; the receipt it returns.
fn one_billed_step(srv: &mut SpanServer, client: PeerId) -> bool {
    let session = SessionId::random();
    let opened = open(srv, client, session);
    assert!(
        matches!(opened, SessionResponse::Opened { .. }),
        "{opened:?}"
    );
    let x = Tensor::ones((1, 3, 128), DType::F32, &Device::Cpu).unwrap();
    let fwd = SessionRequest::Forward {
        session,
        start_pos: 0,
        hidden: WireTensor::from_tensor(&x).unwrap(),
    };
    match srv.handle(client, fwd, std::time::Instant::now()) {
        SessionResponse::Hidden { receipt, .. } => receipt.is_some(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_server_whose_ledger_fails_refuses_new_billed_sessions() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(&dir.path().join("model")).unwrap();
    let files = ModelFiles::open(&dir.path().join("model")).unwrap();
    let ledger = dir.path().join("ledger");
    let store = Store::open(&ledger).unwrap();
    let id = Identity::generate();
    let model = SpanModel::load(&files, BlockRange::new(0, 8), DType::F32, &Device::Cpu).unwrap();
    let mut srv = SpanServer::new(
        ModelId::new(tiny::TINY_MODEL_ID),
        model,
        ServerLimits::default(),
    )
    .with_billing(Billing {
        key: id.signing_key(),
        server: id.peer_id(),
        store: store.clone(),
        price_per_token: 1,
        every_tokens: 1,
        max_unpaid_tokens: 1 << 20,
    })
    .unwrap();
    let client = PeerId::random();
    assert!(
        one_billed_step(&mut srv, client),
        "a sound ledger keeps the receipt"
    );

    // The ledger directory stops taking the store's writes.
    let mark = ledger.join(MARK_FILE);
    let _ = std::fs::remove_file(&mark);
    std::fs::create_dir(&mark).unwrap();
    std::fs::write(mark.join("in-the-way"), b"").unwrap();
    assert!(
        !one_billed_step(&mut srv, client),
        "a receipt the ledger failed to keep is not sent as if kept"
    );

    // From now on no billed session is opened, for this client or any other.
    for who in [client, PeerId::random()] {
        match open(&mut srv, who, SessionId::random()) {
            SessionResponse::Refused(r) if r.to_string().contains("ledger failed") => {}
            other => panic!("a billed session was opened on a failed ledger: {other:?}"),
        }
    }
}
