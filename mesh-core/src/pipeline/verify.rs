//! Checking that servers compute what they claim (none of Petals, exo or llama.cpp's RPC do).
//!
//! On a sampled fraction of steps the client asks for a second opinion on one hop: the
//! same blocks run over the hop's inputs since its last check, either by the client itself
//! (when it holds the weights: [`LocalReference`]) or by another server of the span (a
//! witness), and every answer since that check is compared. Both keep their KV state
//! between checks (the client in `HopState::shadow`, the witness in a session of its own
//! that stays open), so a check runs only the positions since the last one: each position
//! once more per hop whatever the rate, plus one round trip per check. A fresh witness
//! (the first, or one replacing a failed one) runs the whole history once. A server cannot
//! tell which steps are checked: it signs every output ([`crate::ledger::Attestation`]),
//! and a wrong one becomes evidence against it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::model::{ModelError, ModelFiles, SpanCache, SpanModel};
use crate::types::BlockRange;

/// How much of a session a client re-checks.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyConfig {
    /// Fraction of steps, per hop, re-checked (0 turns checking off, 1 checks every step).
    pub rate: f64,
    /// Largest accepted difference: max |claimed − reference| over max |reference|. The
    /// same blocks run as prefill or as decode differ by ~1e-6 in f32; a tampered output
    /// is off by far more.
    pub tolerance: f32,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            rate: 0.0,
            tolerance: 1e-3,
        }
    }
}

impl VerifyConfig {
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }
}

/// max |a − b| / max |b| (0 when both are zero); the shapes must match.
pub fn relative_difference(claimed: &Tensor, reference: &Tensor) -> Result<f32, ModelError> {
    let claimed = claimed.to_dtype(DType::F32)?;
    let reference = reference.to_dtype(DType::F32)?;
    let diff = (&claimed - &reference)?.abs()?.flatten_all()?.max(0)?;
    let scale = reference.abs()?.flatten_all()?.max(0)?;
    let (diff, scale) = (diff.to_scalar::<f32>()?, scale.to_scalar::<f32>()?);
    if diff.is_nan() {
        return Ok(f32::INFINITY);
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// The client's own copy of the blocks, for checking servers without trusting another
/// one. Spans are loaded (memory-mapped) on first use and kept.
pub struct LocalReference {
    model_dir: PathBuf,
    files: Option<ModelFiles>,
    spans: HashMap<BlockRange, SpanModel>,
    positions_run: u64,
}

impl LocalReference {
    /// Checks against the weights in `model_dir` (opened on first use).
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            files: None,
            spans: HashMap::new(),
            positions_run: 0,
        }
    }

    /// Positions run so far, summed over spans: what checking has cost this client.
    pub fn positions_run(&self) -> u64 {
        self.positions_run
    }

    /// Blocks `span` run over `input` (`[1, seq, hidden]`) in f32, continuing `state`: the
    /// hop's earlier inputs already run (a fresh state with room for `max_len` positions
    /// when `None`). Keeping the state between checks makes a check cost only the positions
    /// since the last one, not the whole history again.
    pub fn run_from(
        &mut self,
        span: BlockRange,
        state: &mut Option<SpanCache>,
        input: &Tensor,
        max_len: usize,
    ) -> Result<Tensor, ModelError> {
        let model = self.span(span)?;
        let cache = match state {
            Some(cache) => cache,
            None => state.insert(model.new_cache(max_len)?),
        };
        let start = cache.len();
        let output = model.forward(cache, &input.to_dtype(DType::F32)?, start)?;
        self.positions_run += input.dim(1)? as u64;
        Ok(output)
    }

    fn span(&mut self, span: BlockRange) -> Result<&SpanModel, ModelError> {
        Ok(match self.spans.entry(span) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let files = match self.files.take() {
                    Some(files) => self.files.insert(files),
                    None => self.files.insert(ModelFiles::open(&self.model_dir)?),
                };
                e.insert(SpanModel::load(files, span, DType::F32, &Device::Cpu)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_relative_to_the_reference() {
        let r = Tensor::new(&[[1.0f32, -4.0]], &Device::Cpu).unwrap();
        let same = relative_difference(&r, &r).unwrap();
        assert_eq!(same, 0.0);
        let off = Tensor::new(&[[1.0f32, -3.0]], &Device::Cpu).unwrap();
        assert_eq!(relative_difference(&off, &r).unwrap(), 0.25);
        let nan = Tensor::new(&[[f32::NAN, -4.0]], &Device::Cpu).unwrap();
        assert!(relative_difference(&nan, &r).unwrap() > 1.0);
    }
}
