//! One token through a block on the CPU, in f32 vectors.
//!
//! A decode step's arithmetic is the matrix-vector products ([`super::matvec`]); what is
//! left (norms, rotary, attention over the cache, SwiGLU, residuals) is a few thousand
//! numbers per block. Through candle each of those ~25 ops allocates a tensor and
//! dispatches on dtype and layout, which costs as much as the products on a small model;
//! here they are loops over slices, the hidden state stays in f32 from the first block of
//! a span to its last, and only the keys and values go through candle, written into the
//! session's cache in the span's dtype where prefill reads them.
//!
//! Sums run in f32 whatever the weights are, as HF's eager attention does for scores.

use std::sync::Mutex;

use candle_core::{DType, Device, Storage, Tensor};

use super::super::cache::LayerKv;
use super::super::linear::Linear;
use super::super::matvec::{self, simd, Dense, Elems};
use super::super::rope::RopeTables;
use super::{Block, ModelError, Projections, RmsNorm};

/// The rotary angles of one position: `cos` and `sin` of each frequency.
pub(crate) struct Rotation {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotation {
    pub fn at(rope: &RopeTables, pos: usize) -> Result<Self, ModelError> {
        let (cos, sin) = rope.row_f32(pos)?;
        Ok(Self { cos, sin })
    }

    /// Rotate each `head_dim` head of `x` in place, HF's rotate-half layout: the first
    /// half of a head pairs with its second half.
    fn apply(&self, x: &mut [f32], head_dim: usize) {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * self.cos[i] - x2 * self.sin[i];
                b[i] = x2 * self.cos[i] + x1 * self.sin[i];
            }
        }
    }
}

impl Block {
    /// Whether decode steps take this path (not while the fused kernels are on).
    pub(crate) fn takes_cpu_step(&self) -> bool {
        !self.fused_decode
    }

    /// Whether every product of a step runs on the pool (dense or q8_0 weights): only
    /// then may a step hold the pool's workers spinning, since candle's quantized kernels
    /// bring threads of their own that would wait for those cores.
    pub(crate) fn products_on_pool(&self) -> bool {
        self.attn.qkv.on_pool()
            && self.attn.o_proj.on_pool()
            && self.mlp.gate_up.on_pool()
            && self.mlp.down_proj.on_pool()
    }

    /// Weight elements of the step's largest job (a fused projection counts as one):
    /// whether its steps are worth the pool's workers ([`matvec::worth_sharing`]).
    pub(crate) fn largest_product(&self) -> usize {
        [
            self.attn.qkv.elements(),
            self.attn.o_proj.elements(),
            self.mlp.gate_up.elements(),
            self.mlp.down_proj.elements(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// The block's output for one token of each of several sessions: each row's hidden
    /// state updated in place, its keys and values written at its position of its own
    /// cache in `dtype`. The products read each weight once for all rows ([`matvec`]);
    /// norms, rotary and attention run per row, so every row comes out exactly as it
    /// would alone.
    pub(crate) fn cpu_steps(
        &self,
        rows: &mut [StepRow<'_>],
        dtype: DType,
    ) -> Result<(), ModelError> {
        let _enter = self.span.enter();
        let attn = &self.attn;
        let (nh, nkv, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let normed: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| self.input_layernorm.apply_f32(r.x))
            .collect();
        let qkv = attn.qkv.forward_rows_f32(&normed)?;
        let mut heads = Vec::with_capacity(rows.len());
        for (row, projected) in rows.iter_mut().zip(qkv) {
            let [mut q, mut k, v]: [Vec<f32>; 3] = projected
                .try_into()
                .map_err(|_| ModelError::Unsupported("attention needs q, k and v".into()))?;
            row.rotation.apply(&mut q, hd);
            row.rotation.apply(&mut k, hd);
            let cache = row.kv.storage(1, nkv, hd, dtype, &Device::Cpu)?;
            for (which, values) in [(0, k), (1, v)] {
                let t = Tensor::from_vec(values, (1, nkv, 1, hd), &Device::Cpu)?.to_dtype(dtype)?;
                cache.get(which)?.slice_set(&t, 2, row.pos)?;
            }
            heads.push(attend(&q, cache, nh, nkv, hd, row.pos + 1)?);
        }
        for (row, delta) in rows.iter_mut().zip(project_rows(&attn.o_proj, &heads)?) {
            add(row.x, &delta);
        }

        let normed: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| self.post_attention_layernorm.apply_f32(r.x))
            .collect();
        let mut acts = Vec::with_capacity(rows.len());
        for projected in self.mlp.gate_up.forward_rows_f32(&normed)? {
            let [gate, up]: [Vec<f32>; 2] = projected
                .try_into()
                .map_err(|_| ModelError::Unsupported("the MLP needs gate and up".into()))?;
            acts.push(
                gate.iter()
                    .zip(&up)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect::<Vec<f32>>(),
            );
        }
        for (row, delta) in rows
            .iter_mut()
            .zip(project_rows(&self.mlp.down_proj, &acts)?)
        {
            add(row.x, &delta);
        }
        Ok(())
    }
}

/// One session's token through a block: its hidden state, position, rotary angles and
/// the block's cache of that session.
pub(crate) struct StepRow<'a> {
    pub x: &'a mut [f32],
    pub pos: usize,
    pub rotation: &'a Rotation,
    pub kv: &'a mut LayerKv,
}

fn add(x: &mut [f32], delta: &[f32]) {
    for (x, d) in x.iter_mut().zip(delta) {
        *x += d;
    }
}

impl RmsNorm {
    /// `x / rms(x) · weight`, in f32 as HF computes it.
    fn apply_f32(&self, x: &[f32]) -> Vec<f32> {
        let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (mean_square + self.eps).sqrt();
        x.iter()
            .zip(&self.weight_f32)
            .map(|(v, w)| v * scale * w)
            .collect()
    }
}

impl Projections {
    /// Weight elements of all the projections (one job on the pool).
    fn elements(&self) -> usize {
        match self {
            Self::Separate(parts) => parts.iter().map(Linear::elements).sum(),
            Self::Fused { linear, .. } => linear.weight().elem_count(),
        }
    }

    fn on_pool(&self) -> bool {
        match self {
            Self::Separate(parts) => parts.iter().all(Linear::on_pool),
            Self::Fused { .. } => true,
        }
    }

    /// Every projection of each row of `xs` (`[row][projection]`), through the pool
    /// where the weights allow.
    fn forward_rows_f32(&self, xs: &[Vec<f32>]) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
        match self {
            Self::Separate(parts) => {
                let parts: Vec<&Linear> = parts.iter().collect();
                let rows: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
                if let Some(outs) = Linear::multiply_rows_f32(&parts, &rows)? {
                    return Ok(outs);
                }
                xs.iter()
                    .map(|x| parts.iter().map(|p| project(p, x)).collect())
                    .collect()
            }
            Self::Fused { linear, widths } => Ok(project_rows_dense(linear, xs)?
                .into_iter()
                .map(|all| {
                    let mut at = 0;
                    widths
                        .iter()
                        .map(|&w| {
                            at += w;
                            all[at - w..at].to_vec()
                        })
                        .collect()
                })
                .collect()),
        }
    }
}

/// One projection of each row of `xs`: through the pool when dense, else (quantized)
/// through candle a row at a time.
fn project_rows(linear: &Linear, xs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
    if let Some(dense) = linear.as_dense() {
        return project_rows_dense(dense, xs);
    }
    let rows: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    match Linear::multiply_rows_f32(&[linear], &rows)? {
        Some(outs) if outs.iter().all(|o| o.len() == 1) => {
            Ok(outs.into_iter().flat_map(|mut o| o.pop()).collect())
        }
        _ => xs.iter().map(|x| project(linear, x)).collect(),
    }
}

fn project_rows_dense(dense: &Dense, xs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
    let rows: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    match matvec::multiply_rows_f32(&[dense], &rows)? {
        Some(outs) if outs.iter().all(|o| o.len() == 1) => {
            Ok(outs.into_iter().flat_map(|mut o| o.pop()).collect())
        }
        _ => xs
            .iter()
            .map(|x| via_tensor(x, dense.weight().dtype(), |input| dense.forward(input)))
            .collect(),
    }
}

/// One projection of `x`: through the pool when dense, else (quantized) through candle.
fn project(linear: &Linear, x: &[f32]) -> Result<Vec<f32>, ModelError> {
    match linear.as_dense() {
        Some(dense) => project_rows_dense(dense, &[x.to_vec()])?
            .pop()
            .ok_or_else(|| ModelError::Unsupported("a product gave no row".into())),
        None => via_tensor(x, DType::F32, |input| linear.forward(input)),
    }
}

/// The product through candle, for weights the pool cannot read in place: `x` as a
/// `[1, 1, n]` tensor of `dtype`, the result back as f32.
fn via_tensor(
    x: &[f32],
    dtype: DType,
    forward: impl Fn(&Tensor) -> Result<Tensor, ModelError>,
) -> Result<Vec<f32>, ModelError> {
    let input = Tensor::from_slice(x, (1, 1, x.len()), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(forward(&input)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Grouped-query attention of one query position over cache positions `0..len`: each kv
/// head is read once for its whole group of query heads (scores through the same row
/// kernels as the products, values widened to f32 a row at a time), the kv heads spread
/// over the pool. `cache` is `[2, 1, kv_heads, max_len, head_dim]`.
fn attend(
    q: &[f32],
    cache: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
) -> Result<Vec<f32>, ModelError> {
    let max_len = cache.dim(3)?;
    let (guard, layout) = cache.storage_and_layout();
    let Storage::Cpu(storage) = &*guard else {
        return Err(ModelError::Unsupported(
            "the CPU step needs a CPU cache".into(),
        ));
    };
    let Some(elems) = layout
        .contiguous_offsets()
        .and_then(|(from, to)| Elems::of(storage, from, to))
    else {
        return Err(ModelError::Unsupported(
            "the CPU step needs a contiguous f32, f16 or bf16 cache".into(),
        ));
    };
    let hd = head_dim;
    let group = heads / kv_heads.max(1);
    if elems.len() < 2 * kv_heads * max_len * hd
        || q.len() != heads * hd
        || len > max_len
        || group * kv_heads != heads
    {
        return Err(ModelError::Unsupported(
            "cache and query shapes disagree".into(),
        ));
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let isa = matvec::isa();
    let mut out = vec![0f32; heads * hd];
    let slots: Vec<Mutex<&mut [f32]>> = out.chunks_mut(group * hd).map(Mutex::new).collect();
    // Each kv head's keys and values are read once.
    let read = 2 * kv_heads * len * hd;
    let ok = matvec::run_job(read, kv_heads, &|g| {
        let Ok(mut o) = slots[g].lock() else {
            return;
        };
        let keys = g * max_len; // first key row of this kv head
        let values = (kv_heads + g) * max_len;
        // Scores of every query head of the group, softmaxed in place.
        let mut weights = vec![0f32; group * len];
        for (h, w) in weights.chunks_mut(len.max(1)).enumerate().take(group) {
            let qh = &q[(g * group + h) * hd..(g * group + h + 1) * hd];
            simd::dot_rows(isa, elems, keys, qh, &mut w[..len]);
            let max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
            let mut total = 0f32;
            for s in w.iter_mut() {
                *s = (*s * scale - max).exp();
                total += *s;
            }
            w.iter_mut().for_each(|s| *s /= total);
        }
        let mut row = vec![0f32; hd];
        for p in 0..len {
            simd::widen(elems, (values + p) * hd, &mut row);
            for h in 0..group {
                let w = weights[h * len + p];
                for (o, v) in o[h * hd..(h + 1) * hd].iter_mut().zip(&row) {
                    *o += w * v;
                }
            }
        }
    });
    drop(slots);
    if ok {
        Ok(out)
    } else {
        Err(ModelError::Unsupported("an attention task panicked".into()))
    }
}
