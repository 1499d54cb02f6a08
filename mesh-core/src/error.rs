//! The crate's error type: one enum per area, wrapped here so callers can match on the area.

use crate::model::ModelError;

/// Every error mesh-core returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running a model span failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
