//! When the mesh is thin: blocks no server covers within the discovery window are run by
//! the client itself from its own weights (`--fallback local`), and handed back to the
//! mesh as soon as servers of them appear.
//!
//! A local hop is a hop like any other in the route (marked [`Hop::local`], its peer the
//! client's own id): it keeps the inputs it ran, so when a server of its blocks is known
//! again the hop is replaced exactly as a failed one is, the server rebuilding its cache
//! from those inputs, and the output is what it would have been. It is never billed and
//! never checked (the client trusts its own compute).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Mutex;

use candle_core::Tensor;

use super::hop::HopState;
use super::RemoteSession;
use crate::model::{ModelError, ModelFiles};
use crate::pipeline::route::{plan_with_local, Hop};
use crate::pipeline::verify::LocalReference;
use crate::pipeline::PipelineError;
use crate::types::{BlockRange, SessionId};

/// The blocks this client can run itself: those its model directory holds weights of.
pub struct LocalBlocks {
    held: Vec<BlockRange>,
    runner: Mutex<LocalReference>,
}

impl std::fmt::Debug for LocalBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBlocks")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl LocalBlocks {
    /// The blocks whose weights `model_dir` holds (none, for a directory of only the
    /// embeddings and head); spans load from it on first use.
    pub fn open(model_dir: &Path) -> Result<Self, ModelError> {
        let held = runs(&ModelFiles::open(model_dir)?.blocks_held()?);
        Ok(Self {
            held,
            runner: Mutex::new(LocalReference::new(model_dir.to_path_buf())),
        })
    }

    /// The blocks held, as maximal ranges.
    pub fn held(&self) -> &[BlockRange] {
        &self.held
    }

    /// Blocks `span` over `input`, continuing the hop's KV state.
    fn run(
        &self,
        span: BlockRange,
        state: &mut Option<crate::model::SpanCache>,
        input: &Tensor,
        max_len: usize,
    ) -> Result<Tensor, PipelineError> {
        let mut runner = self.runner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(runner.run_from(span, state, input, max_len)?)
    }
}

/// Run local hop `h` over `x` with `local`'s weights, in a cache of `max_len` positions.
pub(super) fn run_local(
    local: Option<&LocalBlocks>,
    max_len: u32,
    h: &mut HopState,
    x: &Tensor,
) -> Result<Tensor, PipelineError> {
    let local = local.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "blocks {} are routed to this client, which holds no local blocks",
            h.hop.span
        ))
    })?;
    let max_len = usize::try_from(max_len).unwrap_or(usize::MAX);
    local.run(h.hop.span, &mut h.own_cache, x, max_len)
}

/// `blocks` as maximal ranges of consecutive blocks.
fn runs(blocks: &BTreeSet<u32>) -> Vec<BlockRange> {
    let mut out: Vec<BlockRange> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => out.push(BlockRange::new(b, b + 1)),
        }
    }
    out
}

impl RemoteSession {
    /// A route over `range` with the client's own blocks filling what no server covers,
    /// once waiting for servers found none; `None` without local blocks, or when they
    /// leave a gap too.
    pub(super) async fn plan_fallback(
        &self,
        range: BlockRange,
    ) -> Result<Option<Vec<Hop>>, PipelineError> {
        let Some(local) = &self.fallback else {
            return Ok(None);
        };
        let candidates = self.candidates().await?;
        let mut excluded = self.banned.clone();
        excluded.extend(self.too_short.keys());
        let hops = plan_with_local(
            &candidates,
            range,
            &excluded,
            &self.cfg.policy,
            self.tie_break,
            self.p2p.local_peer_id(),
            local.held(),
        );
        if let Some(hops) = &hops {
            let own: Vec<String> = hops
                .iter()
                .filter(|h| h.local)
                .map(|h| h.span.to_string())
                .collect();
            tracing::warn!(
                blocks = %own.join(", "),
                "no server covers these blocks: running them on this client (--fallback local)"
            );
        }
        Ok(hops)
    }

    /// A local hop, ready to run: no server to open a session on.
    pub(super) fn open_local(hop: Hop) -> HopState {
        HopState::new(hop, SessionId::random(), None)
    }

    /// Run local hop `i` over `x` (positions continue its KV state).
    pub(super) fn run_local(&mut self, i: usize, x: &Tensor) -> Result<Tensor, PipelineError> {
        run_local(
            self.fallback.as_deref(),
            self.cfg.max_len,
            &mut self.hops[i],
            x,
        )
    }

    /// Whether servers now cover local hop `i`'s blocks, so it can go back to the mesh.
    pub(super) async fn mesh_covers(&self, i: usize) -> bool {
        let span = self.hops[i].hop.span;
        matches!(self.plan_route(span).await, Ok(Some(_)))
    }

    /// Blocks of `range` this session cannot route, and the servers it knows: for an error
    /// that says what is missing and who was seen.
    pub(super) fn explain_gap(
        candidates: &[crate::pipeline::Candidate],
        range: BlockRange,
        excluded: &HashSet<libp2p::PeerId>,
    ) -> (Vec<BlockRange>, Vec<(libp2p::PeerId, BlockRange)>) {
        let missing = crate::pipeline::route::uncovered(candidates, range, excluded);
        let seen = candidates.iter().map(|c| (c.peer, c.span)).collect();
        (missing, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_blocks_become_maximal_ranges() {
        let blocks = BTreeSet::from([0, 1, 2, 5, 6, 9]);
        let r = |a, b| BlockRange::new(a, b);
        assert_eq!(runs(&blocks), [r(0, 3), r(5, 7), r(9, 10)]);
        assert!(runs(&BTreeSet::new()).is_empty());
    }

    #[test]
    fn the_tiny_model_directory_holds_every_block() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::tiny::write(dir.path()).unwrap();
        let local = LocalBlocks::open(dir.path()).unwrap();
        assert_eq!(local.held(), [BlockRange::new(0, 8)]);
    }
}
