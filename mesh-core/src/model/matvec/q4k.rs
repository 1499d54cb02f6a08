//! Row products of q4k matrices read in place: GGML's super-blocks of 256 weights, each
//! an f16 scale `d` and min scale `dmin`, twelve bytes packing eight 6-bit scales and
//! eight 6-bit mins, and 128 bytes of 4-bit values (144 bytes). Sub-block `s` of 32 holds
//! `w = d·sc[s]·q − dmin·m[s]`; its values are the low nibbles of bytes `32·(s/2)..` for
//! even `s`, the high nibbles for odd `s`.
//!
//! So a row's product is, per sub-block, `d·sc[s]·Σ q·x − dmin·m[s]·Σ x`. The input is
//! rounded once per product to signed bytes and a scale per block of 32 (as llama.cpp
//! and candle round it for this format), which makes `Σ q·x` an exact integer sum: on
//! AVX-512 VNNI one `vpdpbusd` takes 64 nibbles against 64 input bytes. `Σ x` is summed
//! from the input itself, unrounded.

use super::simd::{f16_to_f32, Isa};

/// Weights per super-block.
pub const BLOCK_VALUES: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 144;
/// Weights per sub-block: one scale, one min, one rounding of the input.
const SUB: usize = 32;

/// Where sub-block `s` of the input sits in its super-block's 256 bytes: the low nibbles
/// of 64 weight bytes are sub-blocks 0 and 2 (or 4 and 6), the high ones 1 and 3 (5 and
/// 7), so the input is laid out in that order and one 64-byte load meets each.
const INPUT_AT: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// Bytes of one row of `cols` weights (`cols` a multiple of [`BLOCK_VALUES`]).
pub fn row_bytes(cols: usize) -> usize {
    cols / BLOCK_VALUES * BLOCK_BYTES
}

/// Whether `bytes` hold whole rows of `cols` weights: the shapes these kernels take.
pub fn fits(bytes: &[u8], cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(BLOCK_VALUES) && bytes.len().is_multiple_of(row_bytes(cols))
}

/// A super-block's `d` and `dmin`.
fn scales(block: &[u8]) -> (f32, f32) {
    let half = |at: usize| f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
    (half(0), half(2))
}

/// The eight 6-bit scales and eight 6-bit mins of a super-block, one per byte, unpacked
/// from its twelve bytes four at a time: scales 0..4 are the low six bits of bytes 0..4
/// and mins 0..4 of bytes 4..8; scales 4..8 are the low nibbles of bytes 8..12 under the
/// top two bits of bytes 0..4, mins 4..8 the high nibbles under the top bits of 4..8.
fn scales_and_mins(block: &[u8]) -> (u64, u64) {
    let word =
        |at: usize| u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
    let (a, b, c) = (word(4), word(8), word(12));
    const SIX: u32 = 0x3f3f_3f3f;
    const FOUR: u32 = 0x0f0f_0f0f;
    const TWO: u32 = 0x0303_0303;
    let sc = u64::from(a & SIX) | u64::from((c & FOUR) | (((a >> 6) & TWO) << 4)) << 32;
    let m = u64::from(b & SIX) | u64::from(((c >> 4) & FOUR) | (((b >> 6) & TWO) << 4)) << 32;
    (sc, m)
}

/// The input of a product, rounded per block of 32: `values[at] × scales[j / 32] ≈ x[j]`,
/// each super-block's values in [`INPUT_AT`] order; `sums[j / 32] = Σ x` over the block.
pub struct RoundedInput {
    values: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl RoundedInput {
    /// `x` (a multiple of 256 long) rounded per block to the nearest of 255 steps of its
    /// largest magnitude.
    pub fn of(x: &[f32]) -> Self {
        let mut values = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(x.len() / SUB);
        let mut sums = Vec::with_capacity(x.len() / SUB);
        for (b, block) in x.chunks_exact(SUB).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let at = b / 8 * BLOCK_VALUES + INPUT_AT[b % 8] * SUB;
            for (v, o) in block.iter().zip(&mut values[at..at + SUB]) {
                let r = v * inverse;
                *o = (r + 0.5f32.copysign(r)) as i8;
            }
            scales.push(scale);
            sums.push(block.iter().sum());
        }
        Self {
            values,
            scales,
            sums,
        }
    }

    fn cols(&self) -> usize {
        self.values.len()
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
        // AVX-512F/AVX2, FMA and F16C; VNNI and BW are checked here; the caller checked
        // the rows are in `w` and the input is whole super-blocks.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw") =>
        unsafe { x86::rows_vnni::<4>(w, first, input, out) },
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
    let row = row_bytes(input.cols());
    for (i, o) in out.iter_mut().enumerate() {
        let at = (first + i) * row;
        let mut total = 0f32;
        for (b, block) in w[at..at + row].chunks_exact(BLOCK_BYTES).enumerate() {
            let (d, dmin) = scales(block);
            let (sc, m) = scales_and_mins(block);
            let xs = &input.values[b * BLOCK_VALUES..][..BLOCK_VALUES];
            for s in 0..8 {
                let bytes = &block[16 + s / 2 * SUB..][..SUB];
                let shift = 4 * (s % 2);
                let sum: i32 = bytes
                    .iter()
                    .zip(&xs[INPUT_AT[s] * SUB..][..SUB])
                    .map(|(&q, &x)| i32::from((q >> shift) & 0xF) * i32::from(x))
                    .sum();
                let k = b * 8 + s;
                let (sc, m) = (
                    f32::from((sc >> (8 * s)) as u8),
                    f32::from((m >> (8 * s)) as u8),
                );
                total += d * sc * input.scales[k] * sum as f32 - dmin * m * input.sums[k];
            }
        }
        *o = total;
    }
}

/// Weights `from..from + out.len()` (counted row-major, as if dense) as f32.
pub fn widen(w: &[u8], from: usize, out: &mut [f32]) {
    for (k, o) in out.iter_mut().enumerate() {
        let e = from + k;
        let block = &w[e / BLOCK_VALUES * BLOCK_BYTES..][..BLOCK_BYTES];
        let (d, dmin) = scales(block);
        let (sc, m) = scales_and_mins(block);
        let (s, l) = (e % BLOCK_VALUES / SUB, e % SUB);
        let q = (block[16 + s / 2 * SUB + l] >> (4 * (s % 2))) & 0xF;
        let (sc, m) = (
            f32::from((sc >> (8 * s)) as u8),
            f32::from((m >> (8 * s)) as u8),
        );
        *o = d * sc * f32::from(q) - dmin * m;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::simd::x86::{prefetch, AHEAD_ROWS};
    use super::{row_bytes, scales, scales_and_mins, RoundedInput, BLOCK_BYTES, BLOCK_VALUES};
    use super::{INPUT_AT, SUB};

    /// Eight bytes as eight f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bytes_to_f32(bytes: u64) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64)))
    }

    /// `N` rows at a time share each load of the input, then the rest one by one. Per
    /// super-block and row: four `vpdpbusd` (64 nibbles each against the input's bytes),
    /// each sum of four products turned to f32 and scaled by its sub-block's
    /// `d·sc·input scale` (two sub-blocks per vector, spread by a permute), and the mins'
    /// term as one 8-lane product.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn rows_vnni<const N: usize>(
        w: &[u8],
        first: usize,
        input: &RoundedInput,
        out: &mut [f32],
    ) {
        let blocks = input.cols() / BLOCK_VALUES;
        let row = row_bytes(input.cols());
        let (wp, xp) = (w.as_ptr(), input.values.as_ptr());
        let nibble = _mm512_set1_epi8(0x0F);
        // Lanes 0..8 take scale a, lanes 8..16 scale b, for the pairs (0,2) (1,3) (4,6) (5,7).
        let pair =
            |a: i32, b: i32| _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
        let spread = [pair(0, 2), pair(1, 3), pair(4, 6), pair(5, 7)];
        let mut i = 0;
        while i < out.len() {
            if out.len() - i < N {
                rows_vnni::<1>(w, first + i, input, &mut out[i..]);
                return;
            }
            let mut acc = [_mm512_setzero_ps(); N];
            let mut mins = [_mm256_setzero_ps(); N];
            for b in 0..blocks {
                let x = xp.add(b * BLOCK_VALUES);
                let xv = [0, 1, 2, 3].map(|c| _mm512_loadu_si512(x.add(64 * c).cast()));
                let sx = _mm256_loadu_ps(input.scales.as_ptr().add(b * 8));
                let sums = _mm256_loadu_ps(input.sums.as_ptr().add(b * 8));
                for k in 0..N {
                    let p = wp.add((first + i + k) * row + b * BLOCK_BYTES);
                    prefetch(p, AHEAD_ROWS * row);
                    prefetch(p.add(64), AHEAD_ROWS * row);
                    prefetch(p.add(128), AHEAD_ROWS * row);
                    let block = std::slice::from_raw_parts(p, BLOCK_BYTES);
                    let (d, dmin) = scales(block);
                    let (sc, m) = scales_and_mins(block);
                    let f = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), bytes_to_f32(sc)), sx);
                    let f = _mm512_castps256_ps512(f);
                    let mf = _mm256_mul_ps(_mm256_set1_ps(dmin), bytes_to_f32(m));
                    mins[k] = _mm256_fmadd_ps(mf, sums, mins[k]);
                    for half in 0..2 {
                        let q = _mm512_loadu_si512(p.add(16 + 64 * half).cast());
                        let low = _mm512_and_si512(q, nibble);
                        let high = _mm512_and_si512(_mm512_srli_epi16::<4>(q), nibble);
                        for (j, nibbles) in [low, high].into_iter().enumerate() {
                            let c = 2 * half + j;
                            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles, xv[c]);
                            let scale = _mm512_permutexvar_ps(spread[c], f);
                            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[k]);
                        }
                    }
                }
            }
            for k in 0..N {
                let m = _mm256_add_ps(mins[k], _mm256_permute2f128_ps::<1>(mins[k], mins[k]));
                let m = _mm256_castps256_ps128(m);
                let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_add_ss(m, _mm_shuffle_ps::<0b01>(m, m));
                out[i + k] = _mm512_reduce_add_ps(acc[k]) - _mm_cvtss_f32(m);
            }
            i += N;
        }
    }

    /// One row and one sub-block at a time: `vpmaddubsw` (nibbles × input bytes, pairs
    /// summed to 16 bits, at most 2·15·127) then `vpmaddwd` by ones to 32 bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2(w: &[u8], first: usize, input: &RoundedInput, out: &mut [f32]) {
        let blocks = input.cols() / BLOCK_VALUES;
        let row = row_bytes(input.cols());
        let (wp, xp) = (w.as_ptr(), input.values.as_ptr());
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_ps();
            let mut mins = _mm256_setzero_ps();
            for b in 0..blocks {
                let p = wp.add((first + i) * row + b * BLOCK_BYTES);
                let block = std::slice::from_raw_parts(p, BLOCK_BYTES);
                let (d, dmin) = scales(block);
                let (sc, m) = scales_and_mins(block);
                let sx = _mm256_loadu_ps(input.scales.as_ptr().add(b * 8));
                let f = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), bytes_to_f32(sc)), sx);
                let mut fs = [0f32; 8];
                _mm256_storeu_ps(fs.as_mut_ptr(), f);
                let mf = _mm256_mul_ps(_mm256_set1_ps(dmin), bytes_to_f32(m));
                let sums = _mm256_loadu_ps(input.sums.as_ptr().add(b * 8));
                mins = _mm256_fmadd_ps(mf, sums, mins);
                for pair in 0..4 {
                    let q = _mm256_loadu_si256(p.add(16 + SUB * pair).cast());
                    let halves = [
                        _mm256_and_si256(q, nibble),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(q), nibble),
                    ];
                    for (j, nibbles) in halves.into_iter().enumerate() {
                        let s = 2 * pair + j;
                        let x =
                            _mm256_loadu_si256(xp.add(b * BLOCK_VALUES + INPUT_AT[s] * SUB).cast());
                        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, x), ones);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(fs[s]), acc);
                    }
                }
            }
            let v = _mm256_sub_ps(acc, mins);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            *o = _mm_cvtss_f32(s);
        }
    }
}
