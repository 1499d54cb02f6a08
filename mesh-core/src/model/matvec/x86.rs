//! AVX-512 and AVX2 row products. Rows are read one at a time, front to back, so the
//! weights stream through once as one sequential read; half types widen to f32 in
//! registers (F16C conversion, or a 16-bit shift for bf16) and sums stay in f32.

use std::arch::x86_64::*;

use super::{bf16_to_f32, f16_to_f32, Elems, Isa};

pub fn dot_rows(isa: Isa, w: Elems<'_>, first: usize, x: &[f32], out: &mut [f32]) {
    // SAFETY: `isa` came from `Isa::detect`/`available`, which checked the CPU for these
    // features; every read is within rows `first..first + out.len()` of `w` (checked by
    // the caller) and within `x`.
    unsafe {
        match (isa, w) {
            // One row at a time, as the dense kernels read: four side by side ran 1.1-1.4x
            // slower on AMD Zen 4 (docs/performance.md, "One row at a time").
            (Isa::Avx512, Elems::Bf16(w)) if x.len().is_multiple_of(32) => {
                let (even, odd) = deinterleave(x);
                avx512::rows_bf16_pairs(w, first, &even, &odd, out)
            }
            (Isa::Avx2, Elems::Bf16(w)) if x.len().is_multiple_of(16) => {
                let (even, odd) = deinterleave(x);
                avx2::rows_bf16_pairs(w, first, &even, &odd, out)
            }
            (Isa::Avx512, Elems::F32(w)) => avx512::rows_f32(w, first, x, out),
            (Isa::Avx512, Elems::F16(w)) => avx512::rows_f16(w, first, x, out),
            (Isa::Avx512, Elems::Bf16(w)) => avx512::rows_bf16(w, first, x, out),
            (_, Elems::F32(w)) => avx2::rows_f32(w, first, x, out),
            (_, Elems::F16(w)) => avx2::rows_f16(w, first, x, out),
            (_, Elems::Bf16(w)) => avx2::rows_bf16(w, first, x, out),
            (_, Elems::Q8_0(w)) => super::q8_0::dot_rows(isa, w, first, x, out),
            (_, Elems::Q4K(w)) => super::q4k::dot_rows(isa, w, first, x, out),
        }
    }
}

/// [`dot_rows`] for four inputs at once: each weight load feeds all four, so a batch of
/// sessions runs at about twice the arithmetic rate of one input at a time. Every
/// (row, input) sum runs in the order [`dot_rows`] runs it, so the numbers are the same.
/// `false`: no such kernel for this weight type (bf16, whose one-input kernel pairs its
/// lanes differently); the caller runs the inputs one by one.
pub fn dot_rows_4(
    isa: Isa,
    w: Elems<'_>,
    first: usize,
    xs: [&[f32]; 4],
    outs: &mut [&mut [f32]; 4],
) -> bool {
    // SAFETY: as in `dot_rows`; the four inputs are as long as one another (the caller's
    // rows of one product) and the four outputs too.
    unsafe {
        match (isa, w) {
            (Isa::Avx512, Elems::F32(w)) => avx512::rows4_f32(w, first, xs, outs),
            (Isa::Avx512, Elems::F16(w)) => avx512::rows4_f16(w, first, xs, outs),
            (Isa::Avx2, Elems::F32(w)) => avx2::rows4_f32(w, first, xs, outs),
            (Isa::Avx2, Elems::F16(w)) => avx2::rows4_f16(w, first, xs, outs),
            _ => return false,
        }
    }
    true
}

/// How many rows ahead the quantized kernels ask for the weights they will read next.
/// Each kernel reads rows four at a time, and the hardware's own prefetcher, following
/// four streams, falls behind: asking two groups ahead made q8_0 products about 25 %
/// faster here.
pub(crate) const AHEAD_ROWS: usize = 8;

/// How far ahead, in weight bytes, the dense kernels ask for the weights they will read
/// next. Measured on this VM with f32 and f16 at 512 columns, in rounds where memory gave
/// 66-70 GB/s, a token's products ran fastest 8 KiB ahead: 4 KiB was 16-26 % slower, 12
/// KiB 3 %, 16 KiB 5 %, 32 KiB 10 % (where memory gave 43, every distance from 8 KiB up
/// was alike). That is 4 rows of f32 and 8 of f16 there; never fewer than 4, the rows
/// read together.
const AHEAD_BYTES: usize = 8 << 10;

/// Elements ahead of the current one to prefetch, for rows of `cols` elements of `T`.
fn ahead_elements<T>(cols: usize) -> usize {
    let row_bytes = (cols * std::mem::size_of::<T>()).max(1);
    (AHEAD_BYTES / row_bytes).max(4) * cols
}

/// Starts loading the line `ahead` elements past `p` into the caches.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, ahead: usize) {
    // SAFETY: a prefetch never faults, wherever it points; `wrapping_add` makes the
    // address without claiming it is in bounds.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast()) }
}

/// `x`'s even and odd elements: the bf16 kernels widen a 32-bit lane's two halves (one
/// shift, one mask: no shuffles) and multiply them with these.
fn deinterleave(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    x.chunks_exact(2).map(|p| (p[0], p[1])).unzip()
}

/// bf16 rows against a deinterleaved input, one row at a time (as [`row_kernels`], for
/// the same reason): each load of `$lanes` lanes holds `2 × $lanes` weights, the even ones
/// in each lane's low half, the odd ones in its high half.
macro_rules! bf16_pair_kernel {
    ($feat:literal, $vec:ty, $ivec:ty, $lanes:expr, $zero:ident, $fmadd:ident, $add:ident,
     $loadx:ident, $loadi:ident, $shift:ident, $and:ident, $set1:ident, $cast:ident, $sum:ident) => {
        #[target_feature(enable = $feat)]
        pub unsafe fn rows_bf16_pairs(
            w: &[u16],
            first: usize,
            even: &[f32],
            odd: &[f32],
            out: &mut [f32],
        ) {
            let cols = even.len() * 2;
            let ahead = ahead_elements::<u16>(cols);
            let high = $set1(0xFFFF_0000_u32 as i32);
            let wp = w.as_ptr();
            for (i, o) in out.iter_mut().enumerate() {
                let rp = wp.add((first + i) * cols);
                let (mut acc_even, mut acc_odd): ($vec, $vec) = ($zero(), $zero());
                let mut j = 0;
                while j < cols {
                    let xe = $loadx(even.as_ptr().add(j / 2));
                    let xo = $loadx(odd.as_ptr().add(j / 2));
                    let p = rp.add(j);
                    prefetch(p, ahead);
                    let v: $ivec = $loadi(p.cast());
                    acc_even = $fmadd($cast($shift::<16>(v)), xe, acc_even);
                    acc_odd = $fmadd($cast($and(v, high)), xo, acc_odd);
                    j += 2 * $lanes;
                }
                *o = $sum($add(acc_even, acc_odd));
            }
        }
    };
}

/// One ISA's row kernels: `$lanes` f32 lanes per vector, `$load` widening `$lanes`
/// elements of `$t` at a pointer to one vector, `$scalar` one element to f32.
///
/// Rows go one at a time, front to back, into `$acc` sums of `$lanes` lanes each: the
/// weights stream as one sequential read, which every CPU's prefetchers follow, and the
/// sums' chains leave room for the loads. Four rows read side by side (the first shape of
/// these kernels, sharing each load of `x`) streamed half as fast on AMD Zen 4: 10-11
/// GB/s on one core against 17-20 for one row. Two sums a row stream as fast as four and
/// leave registers for [`row4_kernels`] to take three rows at a time; it keeps this order
/// for every (row, input), so batches are bit for bit.
macro_rules! row_kernels {
    ($feat:literal, $vec:ty, $lanes:expr, $acc:expr, $zero:ident, $fmadd:ident, $add:ident,
     $loadx:ident, $sum:ident, $( $name:ident: $t:ty => $load:ident, $scalar:expr; )+) => {
        $(
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: &[$t], first: usize, x: &[f32], out: &mut [f32]) {
                const STEP: usize = $lanes * $acc;
                let cols = x.len();
                let ahead = ahead_elements::<$t>(cols);
                let main = cols - cols % $lanes;
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                for (i, o) in out.iter_mut().enumerate() {
                    let row = first + i;
                    let rp = wp.add(row * cols);
                    let mut acc: [$vec; $acc] = [$zero(); $acc];
                    let mut j = 0;
                    while j + STEP <= main {
                        for (a, sum) in acc.iter_mut().enumerate() {
                            let at = j + a * $lanes;
                            prefetch(rp.add(at), ahead);
                            *sum = $fmadd($load(rp.add(at)), $loadx(xp.add(at)), *sum);
                        }
                        j += STEP;
                    }
                    while j < main {
                        acc[0] = $fmadd($load(rp.add(j)), $loadx(xp.add(j)), acc[0]);
                        j += $lanes;
                    }
                    let total = acc[1..].iter().fold(acc[0], |t, &a| $add(t, a));
                    let tail: f32 = (main..cols).map(|j| $scalar(w[row * cols + j]) * x[j]).sum();
                    *o = $sum(total) + tail;
                }
            }
        )+
    };
}

/// Four-input row kernels: `$rows` weight rows at a time against four inputs
/// (`$rows × 4 × $acc` sums in registers), then one row at a time; each weight load
/// feeds four inputs and each input load `$rows` rows. Every (row, input) takes the
/// loads [`row_kernels`] takes for it, in its order, so the numbers are the same.
macro_rules! row4_kernels {
    ($feat:literal, $vec:ty, $lanes:expr, $acc:expr, $rows:expr, $zero:ident, $fmadd:ident,
     $add:ident, $loadx:ident, $sum:ident,
     $( $name:ident: $t:ty => $load:ident, $scalar:expr; )+) => {
        $(
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(
                w: &[$t],
                first: usize,
                xs: [&[f32]; 4],
                outs: &mut [&mut [f32]; 4],
            ) {
                const STEP: usize = $lanes * $acc;
                let cols = xs[0].len();
                let ahead = ahead_elements::<$t>(cols);
                let n = outs.iter().map(|o| o.len()).min().unwrap_or(0);
                let main = cols - cols % $lanes;
                let wp = w.as_ptr();
                let xp = [xs[0].as_ptr(), xs[1].as_ptr(), xs[2].as_ptr(), xs[3].as_ptr()];
                let mut i = 0;
                macro_rules! block {
                    ($k:expr) => {{
                        let rp: [*const $t; $k] = std::array::from_fn(|k| wp.add((first + i + k) * cols));
                        let mut acc: [[[$vec; $acc]; 4]; $k] = [[[$zero(); $acc]; 4]; $k];
                        let mut j = 0;
                        while j + STEP <= main {
                            for a in 0..$acc {
                                let at = j + a * $lanes;
                                let xv: [$vec; 4] = std::array::from_fn(|q| $loadx(xp[q].add(at)));
                                for k in 0..$k {
                                    prefetch(rp[k].add(at), ahead);
                                    let wv = $load(rp[k].add(at));
                                    for q in 0..4 {
                                        acc[k][q][a] = $fmadd(wv, xv[q], acc[k][q][a]);
                                    }
                                }
                            }
                            j += STEP;
                        }
                        while j < main {
                            let xv: [$vec; 4] = std::array::from_fn(|q| $loadx(xp[q].add(j)));
                            for k in 0..$k {
                                let wv = $load(rp[k].add(j));
                                for q in 0..4 {
                                    acc[k][q][0] = $fmadd(wv, xv[q], acc[k][q][0]);
                                }
                            }
                            j += $lanes;
                        }
                        for k in 0..$k {
                            let row = first + i + k;
                            for q in 0..4 {
                                let sums = &acc[k][q];
                                let total = sums[1..].iter().fold(sums[0], |t, &a| $add(t, a));
                                let tail: f32 = (main..cols)
                                    .map(|j| $scalar(w[row * cols + j]) * xs[q][j])
                                    .sum();
                                outs[q][i + k] = $sum(total) + tail;
                            }
                        }
                        i += $k;
                    }};
                }
                while n - i >= $rows {
                    block!($rows);
                }
                while i < n {
                    block!(1);
                }
            }
        )+
    };
}

mod avx512 {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p.cast()),
        )))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    bf16_pair_kernel!(
        "avx512f",
        __m512,
        __m512i,
        16,
        _mm512_setzero_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_loadu_ps,
        _mm512_loadu_si512,
        _mm512_slli_epi32,
        _mm512_and_si512,
        _mm512_set1_epi32,
        _mm512_castsi512_ps,
        sum
    );

    row_kernels!("avx512f", __m512, 16, 2, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_add_ps,
        load_f32, sum,
        rows_f32: f32 => load_f32, |v: f32| v;
        rows_f16: u16 => load_f16, f16_to_f32;
        rows_bf16: u16 => load_bf16, bf16_to_f32;
    );

    row4_kernels!("avx512f", __m512, 16, 2, 3, _mm512_setzero_ps, _mm512_fmadd_ps,
        _mm512_add_ps, load_f32, sum,
        rows4_f32: f32 => load_f32, |v: f32| v;
        rows4_f16: u16 => load_f16, f16_to_f32;
    );
}

mod avx2 {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.cast()),
        )))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    bf16_pair_kernel!(
        "avx2,fma,f16c",
        __m256,
        __m256i,
        8,
        _mm256_setzero_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_loadu_ps,
        _mm256_loadu_si256,
        _mm256_slli_epi32,
        _mm256_and_si256,
        _mm256_set1_epi32,
        _mm256_castsi256_ps,
        sum
    );

    row_kernels!("avx2,fma,f16c", __m256, 8, 2, _mm256_setzero_ps, _mm256_fmadd_ps,
        _mm256_add_ps, load_f32, sum,
        rows_f32: f32 => load_f32, |v: f32| v;
        rows_f16: u16 => load_f16, f16_to_f32;
        rows_bf16: u16 => load_bf16, bf16_to_f32;
    );

    row4_kernels!("avx2,fma,f16c", __m256, 8, 2, 1, _mm256_setzero_ps, _mm256_fmadd_ps,
        _mm256_add_ps, load_f32, sum, rows4_f32: f32 => load_f32, |v: f32| v;
        rows4_f16: u16 => load_f16, f16_to_f32;
    );
}
