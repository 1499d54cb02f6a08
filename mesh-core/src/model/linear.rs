//! A projection matrix `y = x Wᵀ + b`, held dense or quantized.
//!
//! The blocks call [`Linear::forward`] and never ask which; only fusing projections on a
//! GPU (stacking dense matrices) looks inside.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use super::matvec::{self, Dense};

use super::ModelError;

/// One projection: a dense candle `Linear`, or a quantized matrix run by `QMatMul`
/// with its bias kept dense.
#[derive(Clone, Debug)]
pub(crate) enum Linear {
    Dense(Dense),
    Quantized {
        matmul: QMatMul,
        bias: Option<Tensor>,
        out_dim: usize,
    },
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense(Dense::new(weight, bias))
    }

    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> Result<Self, ModelError> {
        let out_dim = weight.shape().dims().first().copied().unwrap_or(0);
        Ok(Self::Quantized {
            matmul: QMatMul::from_qtensor(weight)?,
            bias,
            out_dim,
        })
    }

    /// The dense matrix, for stacking and the CPU's matrix-vector path; `None` when
    /// quantized.
    pub fn as_dense(&self) -> Option<&Dense> {
        match self {
            Self::Dense(d) => Some(d),
            Self::Quantized { .. } => None,
        }
    }

    /// The q8_0 or q4k matrix and its bias, for the CPU's matrix-vector path; `None` when
    /// dense or quantized otherwise.
    pub fn as_block_quantized(&self) -> Option<(&QTensor, Option<&Tensor>)> {
        match self {
            Self::Quantized {
                matmul: QMatMul::QTensor(q),
                bias,
                ..
            } if matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4K) => Some((q, bias.as_ref())),
            _ => None,
        }
    }

    /// The dense weight and bias, for stacking; `None` when quantized.
    pub fn dense_parts(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match self {
            Self::Dense(l) => Some((l.weight(), l.bias())),
            Self::Quantized { .. } => None,
        }
    }

    pub fn out_dim(&self) -> candle_core::Result<usize> {
        match self {
            Self::Dense(l) => l.weight().dim(0),
            Self::Quantized { out_dim, .. } => Ok(*out_dim),
        }
    }

    /// Weights in the matrix (rows × columns), however they are stored.
    pub fn elements(&self) -> usize {
        match self {
            Self::Dense(l) => l.weight().elem_count(),
            Self::Quantized {
                matmul: QMatMul::QTensor(q),
                ..
            } => q.shape().elem_count(),
            Self::Quantized {
                matmul: QMatMul::Tensor(t) | QMatMul::TensorF16(t),
                ..
            } => t.elem_count(),
        }
    }

    /// Whether one-row products run on the CPU's matrix-vector path.
    pub fn on_pool(&self) -> bool {
        self.as_dense().is_some() || self.as_block_quantized().is_some()
    }

    /// Every part's product with each of `xs` (`[row][part]`) on the CPU's matrix-vector
    /// path, when the parts are all dense or all q8_0/q4k; `None` otherwise (candle's,
    /// then).
    pub fn multiply_rows_f32(
        parts: &[&Linear],
        xs: &[&[f32]],
    ) -> Result<Option<Vec<Vec<Vec<f32>>>>, ModelError> {
        if let Some(dense) = parts
            .iter()
            .map(|p| p.as_dense())
            .collect::<Option<Vec<_>>>()
        {
            return matvec::multiply_rows_f32(&dense, xs);
        }
        if let Some(quantized) = parts
            .iter()
            .map(|p| p.as_block_quantized())
            .collect::<Option<Vec<_>>>()
        {
            return matvec::multiply_rows_quantized(&quantized, xs);
        }
        Ok(None)
    }

    /// `x`: `[..., in]` in the compute dtype; the result is in the same dtype. Quantized
    /// matrices take f32 input (candle's kernels), so other dtypes are converted around it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Quantized { matmul, bias, .. } => {
                let dtype = x.dtype();
                let y = match dtype {
                    DType::F32 => matmul.forward(&x.contiguous()?)?,
                    _ => matmul
                        .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                        .to_dtype(dtype)?,
                };
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }
}
