//! Matrix-vector products for batch-1 decode on the CPU, at the memory's bandwidth.
//!
//! One decode step multiplies one row by every weight matrix once: its speed is the bytes
//! of the weights over the bandwidth of the memory. candle's gemm reaches about a third of
//! it there (a fork-join per product, AVX2 where the CPU has AVX-512), so a one-row input
//! on the CPU takes this path instead: the process-wide [`pool`] of workers that stay hot
//! between products, rows split across them, each row read once with the widest vector
//! unit the CPU has ([`Isa`]). Products that share an input (q/k/v, gate/up) go to the
//! pool as one job. One-position steps of several sessions ([`multiply_rows_f32`]) share
//! each weight read: blocks of weight rows are dotted with every session's row while in
//! cache, four rows per weight load. A prefill's many positions stay on candle's
//! matrix-matrix path.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use mesh_core::model::matvec::Dense;
//! # fn main() -> Result<(), mesh_core::model::ModelError> {
//! let w = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?;
//! let y = Dense::new(w, None).forward(&Tensor::new(&[[1f32, 0.0, 1.0]], &Device::Cpu)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![2.0, 8.0]]);
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor, D};
use candle_nn::{Linear, Module};

use super::ModelError;

mod pool;
mod q4k;
mod q8_0;
pub(crate) mod simd;
mod spread;
#[cfg(test)]
mod tests;

pub use pool::{global as pool, Hold, WorkerPool};
pub(crate) use simd::Elems;
pub use simd::Isa;

/// Tasks per thread of one job: enough that a worker the OS delays leaves its share to
/// the others, few enough that claiming a task stays a small part of it.
const TASKS_PER_THREAD: usize = 4;

/// Weight bytes a task dots with every input row before it moves on: about what a
/// core's L2 keeps, so several rows (sessions) read each weight from memory once.
const BLOCK_BYTES: usize = 64 << 10;

/// Work (weight elements read, times input rows) below which a job runs on the caller's
/// thread alone, and a step whose jobs all do leaves the workers parked. Handing a job to
/// the workers and waiting for them costs about 2.5 µs on the 2-core machine we measure
/// on, so the split loses below about 48K elements and wins from 128K on (a 512 KiB f32
/// matrix: 22 µs alone, 12.6 µs split). Between the two, what decides is the spinning: the
/// tiny model's steps (largest job 88K elements) ran a 3-node mesh in one process 19 %
/// faster per token with the workers parked than with them spinning through each step
/// for a product or two, which shared two cores with the nodes' network tasks
/// (docs/performance.md).
pub(crate) const MIN_SHARED_WORK: usize = 128 << 10;

/// Whether a job of `work` weight elements (times input rows) goes to the pool's workers
/// ([`MIN_SHARED_WORK`]).
pub(crate) fn worth_sharing(work: usize) -> bool {
    work >= MIN_SHARED_WORK
}

/// Run a job of `work` (as [`worth_sharing`] counts it): across the pool when it is worth
/// the hand-off, else on the caller alone. Returns `false` if a task panicked.
pub(crate) fn run_job(work: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    if worth_sharing(work) {
        pool().run(tasks, task)
    } else {
        pool().run_here(tasks, task)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);
/// 0: not chosen yet (detect on first use); else `Isa as u8 + 1`.
static CHOSEN_ISA: AtomicU8 = AtomicU8::new(0);

/// Turn the path on or off for the whole process (benches compare it with candle's).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The instruction set products run with: [`Isa::detect`] unless [`set_isa`] chose one.
pub fn isa() -> Isa {
    match CHOSEN_ISA.load(Ordering::Relaxed) {
        0 => Isa::detect(),
        n => ALL_ISAS[usize::from(n - 1)],
    }
}

const ALL_ISAS: [Isa; 4] = [Isa::Portable, Isa::Neon, Isa::Avx2, Isa::Avx512];

/// Run products with `isa` from now on; refused (false) when this CPU cannot.
pub fn set_isa(isa: Isa) -> bool {
    if !Isa::available().contains(&isa) {
        return false;
    }
    let index = ALL_ISAS.iter().position(|&i| i == isa).unwrap_or(0);
    CHOSEN_ISA.store(index as u8 + 1, Ordering::Relaxed);
    true
}

/// A projection `y = x Wᵀ + b`, `W` of `[out, in]`: candle's [`Linear`] for many rows and
/// on GPUs, the pool's product for one row on the CPU.
#[derive(Clone, Debug)]
pub struct Dense {
    linear: Linear,
}

impl Dense {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            linear: Linear::new(weight, bias),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.linear.bias()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match forward_many(&[self], x)? {
            Some(mut ys) if ys.len() == 1 => Ok(ys.remove(0)),
            _ => Ok(self.linear.forward(x)?),
        }
    }
}

/// Every part's product with the one row `x`, computed as one job of the pool. `None`
/// when the fast path does not apply: a GPU, more than one row, a weight it cannot read
/// in place (not contiguous, not f32/f16/bf16), or the path turned off.
pub fn forward_many(parts: &[&Dense], x: &Tensor) -> Result<Option<Vec<Tensor>>, ModelError> {
    let cols = x.dim(D::Minus1)?;
    if !enabled() || !matches!(x.device(), Device::Cpu) || x.elem_count() != cols {
        return Ok(None);
    }
    let input = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let Some(outs) = multiply_f32(parts, &input)? else {
        return Ok(None);
    };
    let mut ys = Vec::with_capacity(parts.len());
    for (part, out) in parts.iter().zip(outs) {
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out.len();
        }
        ys.push(Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(part.weight().dtype())?);
    }
    Ok(Some(ys))
}

/// `parts[p] · x (+ bias)` for every part, in f32, as one job of the pool. `None` when a
/// weight cannot be read in place: not on the CPU, not contiguous, not f32/f16/bf16, or
/// not `x.len()` wide.
pub fn multiply_f32(parts: &[&Dense], x: &[f32]) -> Result<Option<Vec<Vec<f32>>>, ModelError> {
    Ok(multiply_rows_f32(parts, &[x])?.and_then(|mut rows| rows.pop()))
}

/// [`multiply_f32`] for several input rows at once (decode steps of several sessions):
/// `[row][part]`. Each task reads its chunk of weight rows once from memory and dots it
/// with every input row while it is in cache, so `n` rows cost about one row's weight
/// traffic; each row's arithmetic is exactly what it is alone.
pub fn multiply_rows_f32(
    parts: &[&Dense],
    xs: &[&[f32]],
) -> Result<Option<Vec<Vec<Vec<f32>>>>, ModelError> {
    let Some(cols) = xs.first().map(|x| x.len()) else {
        return Ok(Some(Vec::new()));
    };
    if xs.iter().any(|x| x.len() != cols) {
        return Ok(None);
    }
    let guards: Vec<_> = parts
        .iter()
        .map(|p| p.weight().storage_and_layout())
        .collect();
    let mut weights = Vec::with_capacity(parts.len());
    for (guard, layout) in &guards {
        let Storage::Cpu(storage) = &**guard else {
            return Ok(None);
        };
        let (Some((from, to)), [_, w_cols]) = (layout.contiguous_offsets(), layout.dims()) else {
            return Ok(None);
        };
        if *w_cols != cols {
            return Ok(None);
        }
        let Some(elems) = Elems::of(storage, from, to) else {
            return Ok(None);
        };
        weights.push(elems);
    }
    let outs = multiply_all(&weights, xs)?;
    drop(guards);
    let biases: Vec<Option<&Tensor>> = parts.iter().map(|p| p.bias()).collect();
    add_biases(outs, &biases).map(Some)
}

/// [`multiply_rows_f32`] for q8_0 and q4k matrices (GGML's blocks, read in place) and
/// their biases. `None` when a matrix is neither on the CPU, or its rows are not `xs`'
/// width or not whole blocks wide.
pub fn multiply_rows_quantized(
    parts: &[(&QTensor, Option<&Tensor>)],
    xs: &[&[f32]],
) -> Result<Option<Vec<Vec<Vec<f32>>>>, ModelError> {
    let Some(cols) = xs.first().map(|x| x.len()) else {
        return Ok(Some(Vec::new()));
    };
    if xs.iter().any(|x| x.len() != cols) {
        return Ok(None);
    }
    let mut weights = Vec::with_capacity(parts.len());
    for (q, _) in parts {
        if !q.device().is_cpu() || !matches!(q.shape().dims(), [_, c] if *c == cols) {
            return Ok(None);
        }
        let Cow::Borrowed(bytes) = q.data()? else {
            return Ok(None);
        };
        weights.push(match q.dtype() {
            GgmlDType::Q8_0 if q8_0::fits(bytes, cols) => Elems::Q8_0(bytes),
            GgmlDType::Q4K if q4k::fits(bytes, cols) => Elems::Q4K(bytes),
            _ => return Ok(None),
        });
    }
    let outs = multiply_all(&weights, xs)?;
    let biases: Vec<Option<&Tensor>> = parts.iter().map(|(_, b)| *b).collect();
    add_biases(outs, &biases).map(Some)
}

/// `[row][part]` products of every weight with every input row.
fn multiply_all(weights: &[Elems<'_>], xs: &[&[f32]]) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    let cols = xs.first().map_or(1, |x| x.len().max(1));
    let mut outs: Vec<Vec<Vec<f32>>> = xs
        .iter()
        .map(|_| weights.iter().map(|w| vec![0f32; w.len() / cols]).collect())
        .collect();
    multiply(weights, xs, &mut outs)?;
    Ok(outs)
}

/// Add part `p`'s bias (if any) to every row's output of part `p`.
fn add_biases(
    mut outs: Vec<Vec<Vec<f32>>>,
    biases: &[Option<&Tensor>],
) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    for (p, bias) in biases.iter().enumerate() {
        if let Some(b) = bias {
            let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for row in outs.iter_mut() {
                for (o, b) in row[p].iter_mut().zip(&b) {
                    *o += b;
                }
            }
        }
    }
    Ok(outs)
}

/// `outs[r][p] = weights[p] · xs[r]` for every part and row, the weight rows of all parts
/// split across the pool.
fn multiply(
    weights: &[simd::Elems<'_>],
    xs: &[&[f32]],
    outs: &mut [Vec<Vec<f32>>],
) -> Result<(), ModelError> {
    let pool = pool();
    let cols = xs.first().map_or(1, |x| x.len().max(1));
    let total: usize = weights.iter().map(|w| w.len() / cols).sum();
    let chunk = total
        .div_ceil(pool.threads() * TASKS_PER_THREAD)
        .next_multiple_of(4)
        .max(4);
    // Task `t` is chunk `c` of part `p`: its weight rows, and the same rows of every
    // input row's output.
    struct Task<'a> {
        part: usize,
        first: usize,
        rows: Mutex<Vec<&'a mut [f32]>>,
    }
    let mut tasks: Vec<Task<'_>> = Vec::new();
    for (r, row) in outs.iter_mut().enumerate() {
        let mut t = 0;
        for (part, out) in row.iter_mut().enumerate() {
            for (c, rows) in out.chunks_mut(chunk).enumerate() {
                if r == 0 {
                    tasks.push(Task {
                        part,
                        first: c * chunk,
                        rows: Mutex::new(Vec::with_capacity(xs.len())),
                    });
                }
                if let Some(Ok(slots)) = tasks.get_mut(t).map(|task| task.rows.get_mut()) {
                    slots.push(rows);
                }
                t += 1;
            }
        }
    }
    let isa = isa();
    // Quantized products take each input rounded per block, once for all their tasks.
    let any = |f: fn(&Elems<'_>) -> bool| weights.iter().any(f);
    let rounded_q8_0: Vec<q8_0::RoundedInput> = if any(|w| matches!(w, Elems::Q8_0(_))) {
        xs.iter().map(|x| q8_0::RoundedInput::of(x)).collect()
    } else {
        Vec::new()
    };
    let rounded_q4k: Vec<q4k::RoundedInput> = if any(|w| matches!(w, Elems::Q4K(_))) {
        xs.iter().map(|x| q4k::RoundedInput::of(x)).collect()
    } else {
        Vec::new()
    };
    let ok = run_job(total * cols * xs.len(), tasks.len(), &|t| {
        let task = &tasks[t];
        let w = weights[task.part];
        match (w, task.rows.lock()) {
            (Elems::Q8_0(bytes), Ok(mut slots)) => {
                for (input, rows) in rounded_q8_0.iter().zip(slots.iter_mut()) {
                    q8_0::dot_rows_rounded(isa, bytes, task.first, input, rows);
                }
                return;
            }
            (Elems::Q4K(bytes), Ok(mut slots)) => {
                for (input, rows) in rounded_q4k.iter().zip(slots.iter_mut()) {
                    q4k::dot_rows_rounded(isa, bytes, task.first, input, rows);
                }
                return;
            }
            _ => {}
        }
        // A few weight rows at a time (about L2-sized), dotted with every input row
        // while they are in cache. One input row takes the same path, so its numbers
        // are the same alone or among others.
        let block = (BLOCK_BYTES / w.row_bytes(cols).max(1))
            .next_multiple_of(4)
            .max(4);
        if let Ok(mut slots) = task.rows.lock() {
            let len = slots.first().map_or(0, |rows| rows.len());
            for start in (0..len).step_by(block) {
                let end = (start + block).min(len);
                // Four inputs at a time share each weight load; the rest one by one.
                for (xq, sq) in xs.chunks(4).zip(slots.chunks_mut(4)) {
                    match (xq, &mut *sq) {
                        ([x0, x1, x2, x3], [s0, s1, s2, s3]) => simd::dot_rows_4(
                            isa,
                            w,
                            task.first + start,
                            [x0, x1, x2, x3],
                            [
                                &mut s0[start..end],
                                &mut s1[start..end],
                                &mut s2[start..end],
                                &mut s3[start..end],
                            ],
                        ),
                        _ => {
                            for (x, rows) in xq.iter().zip(sq.iter_mut()) {
                                simd::dot_rows(
                                    isa,
                                    w,
                                    task.first + start,
                                    x,
                                    &mut rows[start..end],
                                );
                            }
                        }
                    }
                }
            }
        }
    });
    if ok {
        Ok(())
    } else {
        Err(candle_core::Error::Msg("a matrix-vector task panicked".into()).into())
    }
}
