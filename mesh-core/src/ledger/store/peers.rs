//! The store's second and third trees: what this peer thinks of others
//! ([`PeerRecord`], keyed by peer id bytes) and the evidence behind it ([`Evidence`],
//! keyed by time then session, so it reads back oldest first). Same database, same
//! durability rule as receipts: flushed before returning.

use libp2p::PeerId;

use super::{decode_bounded, encode_bounded, Store, StoreError};
use crate::ledger::reputation::{Evidence, PeerRecord};
use crate::ledger::LedgerError;

/// Longest evidence record: two hidden-state frames of one step, with room to spare.
pub const MAX_EVIDENCE_BYTES: usize = 8 << 20;

const PEERS_TREE: &str = "peers-v1";
const EVIDENCE_TREE: &str = "evidence-v1";

impl Store {
    fn open_named(&self, name: &str) -> Result<sled::Tree, LedgerError> {
        Ok(self.db.open_tree(name).map_err(StoreError::from)?)
    }

    pub fn peer_record(&self, peer: &PeerId) -> Result<Option<PeerRecord>, LedgerError> {
        let k = peer.to_bytes();
        match self
            .open_named(PEERS_TREE)?
            .get(&k)
            .map_err(StoreError::from)?
        {
            Some(v) => decode_bounded(&k, &v, super::MAX_RECORD_BYTES).map(Some),
            None => Ok(None),
        }
    }

    pub fn put_peer_record(&self, peer: &PeerId, rec: &PeerRecord) -> Result<(), LedgerError> {
        let tree = self.open_named(PEERS_TREE)?;
        let v = encode_bounded(rec, super::MAX_RECORD_BYTES, "peer record")?;
        tree.insert(peer.to_bytes(), v).map_err(StoreError::from)?;
        tree.flush().map_err(StoreError::from)?;
        Ok(())
    }

    pub fn add_evidence(&self, ev: &Evidence) -> Result<(), LedgerError> {
        let tree = self.open_named(EVIDENCE_TREE)?;
        let v = encode_bounded(ev, MAX_EVIDENCE_BYTES, "evidence")?;
        let mut k = ev.at_ms.to_be_bytes().to_vec();
        k.extend_from_slice(&ev.session.0);
        k.extend(ev.server.to_bytes());
        tree.insert(k, v).map_err(StoreError::from)?;
        tree.flush().map_err(StoreError::from)?;
        Ok(())
    }

    /// Up to `limit` evidence records, oldest first.
    pub fn evidence(&self, limit: usize) -> Result<Vec<Evidence>, LedgerError> {
        self.open_named(EVIDENCE_TREE)?
            .iter()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(StoreError::from)?;
                decode_bounded(&k, &v, MAX_EVIDENCE_BYTES)
            })
            .collect()
    }
}
