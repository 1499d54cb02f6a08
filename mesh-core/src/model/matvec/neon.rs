//! Advanced SIMD row products for aarch64: four rows share each load of `x`. bf16 widens
//! by a 16-bit shift; f16 widens through the scalar converter (Rust's f16 vector types
//! are not stable yet), so an f16 span on aarch64 is compute-bound before it is
//! bandwidth-bound.

use std::arch::aarch64::*;

use super::{bf16_to_f32, f16_to_f32, Elems};

pub fn dot_rows(w: Elems<'_>, first: usize, x: &[f32], out: &mut [f32]) {
    // SAFETY: NEON was detected by `Isa::detect`; every read is within rows
    // `first..first + out.len()` of `w` (checked by the caller) and within `x`.
    unsafe {
        match w {
            Elems::F32(w) => rows(w, first, x, out, |p| vld1q_f32(p), |v| v),
            Elems::Q8_0(w) => super::q8_0::portable_rows(w, first, x, out),
            Elems::Q4K(w) => super::q4k::portable_rows(w, first, x, out),
            Elems::Bf16(w) => rows(
                w,
                first,
                x,
                out,
                |p| vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))),
                bf16_to_f32,
            ),
            Elems::F16(w) => rows(
                w,
                first,
                x,
                out,
                |p| {
                    let v = [
                        f16_to_f32(*p),
                        f16_to_f32(*p.add(1)),
                        f16_to_f32(*p.add(2)),
                        f16_to_f32(*p.add(3)),
                    ];
                    vld1q_f32(v.as_ptr())
                },
                f16_to_f32,
            ),
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn rows<T: Copy>(
    w: &[T],
    first: usize,
    x: &[f32],
    out: &mut [f32],
    load: impl Fn(*const T) -> float32x4_t,
    scalar: impl Fn(T) -> f32,
) {
    let cols = x.len();
    let main = cols - cols % 4;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let tail = |row: usize| -> f32 { (main..cols).map(|j| scalar(w[row * cols + j]) * x[j]).sum() };
    let mut i = 0;
    while i < out.len() {
        let n = (out.len() - i).min(4);
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut j = 0;
        while j < main {
            let xv = vld1q_f32(xp.add(j));
            for (k, a) in acc.iter_mut().enumerate().take(n) {
                *a = vfmaq_f32(*a, load(wp.add((first + i + k) * cols + j)), xv);
            }
            j += 4;
        }
        for (k, a) in acc.iter().enumerate().take(n) {
            out[i + k] = vaddvq_f32(*a) + tail(first + i + k);
        }
        i += n;
    }
}
