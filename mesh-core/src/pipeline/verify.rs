//! Checking that servers compute what they claim (none of Petals, exo or llama.cpp's RPC do).
//!
//! On a sampled fraction of steps the client asks for a second opinion on one hop: it
//! re-runs that hop's whole input history through the same blocks, either itself (when it
//! holds the weights: [`LocalReference`]) or on another server of the span, and compares
//! the positions of this step. The second opinion is a prefill of the history, so one
//! check costs about as much compute as the session so far on that span, plus one round
//! trip; at rate `r` a session of `n` tokens costs about `r·n²/2` extra positions per
//! checked hop. A server cannot tell which steps are checked: it signs every output
//! ([`crate::ledger::Attestation`]), and a wrong one becomes evidence against it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::model::{ModelError, ModelFiles, SpanModel};
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
}

impl LocalReference {
    /// Checks against the weights in `model_dir` (opened on first use).
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            files: None,
            spans: HashMap::new(),
        }
    }

    /// Blocks `span` run over `history` (`[1, len, hidden]`, positions `0..len`) in f32.
    pub fn run(&mut self, span: BlockRange, history: &Tensor) -> Result<Tensor, ModelError> {
        let model = match self.spans.entry(span) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let files = match self.files.take() {
                    Some(files) => self.files.insert(files),
                    None => self.files.insert(ModelFiles::open(&self.model_dir)?),
                };
                e.insert(SpanModel::load(files, span, DType::F32, &Device::Cpu)?)
            }
        };
        let mut cache = model.new_cache(history.dim(1)?)?;
        model.forward(&mut cache, &history.to_dtype(DType::F32)?, 0)
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
