//! Row products of q8_0 matrices read in place: GGML's blocks of 32 weights, each an f16
//! scale and 32 signed bytes (34 bytes), dotted with f32 inputs.
//!
//! candle's `QMatMul` rounds the input to 8 bits as well and multiplies bytes by bytes;
//! here the weights are widened to f32 in registers and the input is used as it is, so a
//! decode step reads 34 bytes per 32 weights (a quarter of f32's bytes, plus the scales)
//! and loses nothing to the input's rounding. Per block, the 32 products are summed and
//! then scaled; sums stay in f32.

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

/// `out[i] = Σ_j w[first + i][j] · x[j]`: `w` whole rows of `x.len()` weights (checked by
/// the caller with [`fits`]), rows `first..first + out.len()` within it.
pub fn dot_rows(isa: Isa, w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
    match isa {
        // SAFETY: `isa` came from `Isa::detect`/`available`, which checked the CPU for
        // these features (AVX-512 implies F16C); the caller checked the rows are in `w`
        // and `x.len()` is a multiple of 32.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::rows_avx512::<4>(w, first, x, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::rows_avx2::<4>(w, first, x, out) },
        _ => portable_rows(w, first, x, out),
    }
}

/// The reference: per block, the 32 products summed in eight lanes, then scaled.
pub fn portable_rows(w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
    let row = row_bytes(x.len());
    for (i, o) in out.iter_mut().enumerate() {
        let at = (first + i) * row;
        *o = w[at..at + row]
            .chunks_exact(BLOCK_BYTES)
            .zip(x.chunks_exact(BLOCK_VALUES))
            .map(|(block, xs)| {
                let mut lanes = [0f32; 8];
                for (q, x) in block[2..].chunks_exact(8).zip(xs.chunks_exact(8)) {
                    for k in 0..8 {
                        lanes[k] += f32::from(q[k] as i8) * x[k];
                    }
                }
                lanes.iter().sum::<f32>() * scale(block)
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

    use super::{row_bytes, BLOCK_BYTES, BLOCK_VALUES};

    /// A block's scale, converted by F16C.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale(block: *const u8) -> f32 {
        let bits = i32::from(u16::from_le_bytes([*block, *block.add(1)]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// Eight signed bytes as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
    }

    /// `N` rows at a time share each load of the input's block, then the rest one by one.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn rows_avx512<const N: usize>(w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
        let blocks = x.len() / BLOCK_VALUES;
        let row = row_bytes(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut i = 0;
        while i < out.len() {
            if out.len() - i < N {
                rows_avx512::<1>(w, first + i, x, &mut out[i..]);
                return;
            }
            let mut acc = [_mm512_setzero_ps(); N];
            for b in 0..blocks {
                let x0 = _mm512_loadu_ps(xp.add(b * BLOCK_VALUES));
                let x1 = _mm512_loadu_ps(xp.add(b * BLOCK_VALUES + 16));
                for (k, acc) in acc.iter_mut().enumerate() {
                    let p = wp.add((first + i + k) * row + b * BLOCK_BYTES);
                    let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast()));
                    let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast()));
                    let sum = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(hi),
                        x1,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(lo), x0),
                    );
                    *acc = _mm512_fmadd_ps(sum, _mm512_set1_ps(scale(p)), *acc);
                }
            }
            for (k, acc) in acc.iter().enumerate() {
                out[i + k] = _mm512_reduce_add_ps(*acc);
            }
            i += N;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<const N: usize>(w: &[u8], first: usize, x: &[f32], out: &mut [f32]) {
        let blocks = x.len() / BLOCK_VALUES;
        let row = row_bytes(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut i = 0;
        while i < out.len() {
            if out.len() - i < N {
                rows_avx2::<1>(w, first + i, x, &mut out[i..]);
                return;
            }
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..blocks {
                let at = xp.add(b * BLOCK_VALUES);
                let x0 = _mm256_loadu_ps(at);
                let x1 = _mm256_loadu_ps(at.add(8));
                let x2 = _mm256_loadu_ps(at.add(16));
                let x3 = _mm256_loadu_ps(at.add(24));
                for (k, acc) in acc.iter_mut().enumerate() {
                    let p = wp.add((first + i + k) * row + b * BLOCK_BYTES);
                    let sum = _mm256_mul_ps(widen8(p.add(2)), x0);
                    let sum = _mm256_fmadd_ps(widen8(p.add(10)), x1, sum);
                    let sum = _mm256_fmadd_ps(widen8(p.add(18)), x2, sum);
                    let sum = _mm256_fmadd_ps(widen8(p.add(26)), x3, sum);
                    *acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(scale(p)), *acc);
                }
            }
            for (k, acc) in acc.iter().enumerate() {
                let s = _mm_add_ps(
                    _mm256_castps256_ps128(*acc),
                    _mm256_extractf128_ps::<1>(*acc),
                );
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                out[i + k] = _mm_cvtss_f32(s);
            }
            i += N;
        }
    }
}
