//! Row products of q8_0 matrices read in place: GGML's blocks of 32 weights, each an f16
//! scale and 32 signed bytes (34 bytes), dotted with an f32 input.
//!
//! The input is rounded per block of 32 to 16-bit integers and a scale (a relative error
//! of at most 2^-16 of the block's largest value, far below the weights' own 8 bits; candle's
//! `QMatMul` and llama.cpp round it to 8 bits). Each block's 32 products are then exact
//! integer sums (`vpmaddwd`: two products per lane, within f32's exact range), turned
//! to f32 and scaled by weight scale × input scale. Widening bytes to f32 instead cost
//! about ten vector instructions a block and left the kernel bound by arithmetic; this
//! is about five, so a step reads 34 bytes per 32 weights at the memory's pace.

use super::simd::{f16_to_f32, Isa};

/// Weights per block.
pub const BLOCK_VALUES: usize = 32;
/// Bytes per block: the f16 scale, then the 32 signed bytes.
pub const BLOCK_BYTES: usize = 34;

/// Bytes of one row of `cols` weights (`cols` a multiple of [`BLOCK_VALUES`]).
pub fn row_bytes(cols: usize) -> usize {
    cols / BLOCK_VALUES * BLOCK_BYTES
}

/// Whether `bytes` hold whole rows of `cols` weights: the shapes these kernels take.
pub fn fits(bytes: &[u8], cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(BLOCK_VALUES) && bytes.len().is_multiple_of(row_bytes(cols))
}

fn scale(block: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[0], block[1]]))
}

/// The input of a product, rounded per block: `values[j] × scales[j / 32] ≈ x[j]`.
pub struct RoundedInput {
    values: Vec<i16>,
    scales: Vec<f32>,
}

impl RoundedInput {
    /// `x` (a multiple of 32 long) rounded per block to the nearest of 65535 steps of
    /// its largest magnitude.
    pub fn of(x: &[f32]) -> Self {
        let mut values = Vec::with_capacity(x.len());
        let mut scales = Vec::with_capacity(x.len() / BLOCK_VALUES);
        for block in x.chunks_exact(BLOCK_VALUES) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / f32::from(i16::MAX);
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // Half away from zero, then truncated: `round` would be a libm call per value.
            values.extend(block.iter().map(|v| {
                let r = v * inverse;
                (r + 0.5f32.copysign(r)) as i16
            }));
            scales.push(scale);
        }
        Self { values, scales }
    }
}

/// `out[i] = Σ_j w[first + i][j] · x[j]`: `w` whole rows of `x.len()` weights (checked by
/// the caller with [`fits`]), rows `first..first + out.len()` within it.
pub fn dot_rows(isa: Isa, w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
    dot_rows_rounded(isa, w, first, &RoundedInput::of(x), out);
}

/// [`dot_rows`] of an input already rounded.
pub fn dot_rows_rounded(isa: Isa, w: &[u8], first: usize, input: &RoundedInput, out: &mut [f32]) {
    match isa {
        // SAFETY: `isa` came from `Isa::detect`/`available`, which checked the CPU for
        // these features (AVX-512 implies F16C; BW is checked here); the caller checked
        // the rows are in `w` and `x.len()` is a multiple of 32. One row at a time: four
        // side by side were a little slower on AMD Zen 4 (docs/performance.md).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512bw") => unsafe {
            x86::rows_avx512(w, first, input, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::rows_avx2(w, first, input, out) },
        _ => rounded_rows(w, first, input, out),
    }
}

/// The reference: [`dot_rows`] in plain Rust.
pub fn portable_rows(w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
    rounded_rows(w, first, &RoundedInput::of(x), out);
}

fn rounded_rows(w: &[u8], first: usize, input: &RoundedInput, out: &mut [f32]) {
    let row = row_bytes(input.values.len());
    for (i, o) in out.iter_mut().enumerate() {
        let at = (first + i) * row;
        *o = w[at..at + row]
            .chunks_exact(BLOCK_BYTES)
            .zip(input.values.chunks_exact(BLOCK_VALUES))
            .zip(&input.scales)
            .map(|((block, xs), sx)| {
                let sum: i32 = block[2..]
                    .iter()
                    .zip(xs)
                    .map(|(&q, &x)| i32::from(q as i8) * i32::from(x))
                    .sum();
                sum as f32 * (scale(block) * sx)
            })
            .sum();
    }
}

/// Weights `from..from + out.len()` (counted row-major, as if dense) as f32.
pub fn widen(w: &[u8], from: usize, out: &mut [f32]) {
    for (k, o) in out.iter_mut().enumerate() {
        let e = from + k;
        let block = &w[e / BLOCK_VALUES * BLOCK_BYTES..][..BLOCK_BYTES];
        *o = f32::from(block[2 + e % BLOCK_VALUES] as i8) * scale(block);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::simd::x86::{prefetch, AHEAD_ROWS};
    use super::{row_bytes, RoundedInput, BLOCK_BYTES, BLOCK_VALUES};

    /// A block's weight scale, converted by F16C.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale(block: *const u8) -> f32 {
        let bits = i32::from(u16::from_le_bytes([*block, *block.add(1)]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// One row at a time (as the dense kernels: one sequential stream); the scales of 16
    /// blocks of a row are converted at once.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn rows_avx512(w: &[u8], first: usize, input: &RoundedInput, out: &mut [f32]) {
        let blocks = input.scales.len();
        let row = row_bytes(input.values.len());
        let (wp, xp, sp) = (w.as_ptr(), input.values.as_ptr(), input.scales.as_ptr());
        for (i, o) in out.iter_mut().enumerate() {
            let rp = wp.add((first + i) * row);
            let mut acc = _mm512_setzero_ps();
            let mut scales = [0f32; 16];
            let mut b0 = 0;
            while b0 < blocks {
                let nb = (blocks - b0).min(16);
                let mask: __mmask16 = if nb == 16 { 0xFFFF } else { (1u16 << nb) - 1 };
                let sx = _mm512_maskz_loadu_ps(mask, sp.add(b0));
                let mut bits = [0u16; 16];
                for (b, bits) in bits.iter_mut().enumerate().take(nb) {
                    let p = rp.add((b0 + b) * BLOCK_BYTES);
                    *bits = u16::from_le(p.cast::<u16>().read_unaligned());
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr().cast()));
                _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_mul_ps(d, sx));
                for b in b0..b0 + nb {
                    let xv = _mm512_loadu_si512(xp.add(b * BLOCK_VALUES).cast());
                    let p = rp.add(b * BLOCK_BYTES + 2);
                    // The scale pass touches each line first and would wait on it.
                    prefetch(p, AHEAD_ROWS * row);
                    let wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.cast()));
                    let sums = _mm512_cvtepi32_ps(_mm512_madd_epi16(wv, xv));
                    acc = _mm512_fmadd_ps(sums, _mm512_set1_ps(scales[b - b0]), acc);
                }
                b0 += nb;
            }
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2(w: &[u8], first: usize, input: &RoundedInput, out: &mut [f32]) {
        let row = row_bytes(input.values.len());
        let (wp, xp) = (w.as_ptr(), input.values.as_ptr());
        for (i, o) in out.iter_mut().enumerate() {
            let rp = wp.add((first + i) * row);
            let mut acc = _mm256_setzero_ps();
            for (b, sx) in input.scales.iter().enumerate() {
                let at = xp.add(b * BLOCK_VALUES);
                let x0 = _mm256_loadu_si256(at.cast());
                let x1 = _mm256_loadu_si256(at.add(16).cast());
                let p = rp.add(b * BLOCK_BYTES);
                let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(2).cast()));
                let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(18).cast()));
                // At most four products of 127 × 32767 a lane: exact in f32.
                let sums = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                let s = _mm256_set1_ps(scale(p) * sx);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, acc);
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            *o = _mm_cvtss_f32(s);
        }
    }
}
