//! Row dot products against one input vector, with the widest vector unit the CPU has,
//! chosen at run time. The portable loop is the reference the others are tested against.

use std::sync::OnceLock;

use super::{q4k, q8_0};

#[cfg(target_arch = "aarch64")]
#[path = "neon.rs"]
mod neon;
#[cfg(target_arch = "x86_64")]
#[path = "x86.rs"]
pub(super) mod x86;

/// The instruction set a product runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust: the reference, and what runs where nothing better is known.
    Portable,
    /// aarch64 Advanced SIMD (4 f32 lanes).
    Neon,
    /// x86-64 AVX2 with FMA and F16C (8 f32 lanes).
    Avx2,
    /// x86-64 AVX-512F (16 f32 lanes).
    Avx512,
}

impl Isa {
    /// What this CPU supports, at most `MESH_CPU_ISA` (`portable`, `avx2`, `neon`) when set:
    /// benches compare the paths side by side, and a user can step down from a path that
    /// misbehaves on their CPU.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best();
            match std::env::var("MESH_CPU_ISA").ok().as_deref().map(str::trim) {
                Some(v) => Self::parse(v).map_or(best, |cap| cap.min(best)),
                None => best,
            }
        })
    }

    /// Every path this CPU can run, the portable one first.
    pub fn available() -> Vec<Isa> {
        let best = Self::best();
        [Isa::Portable, Isa::Neon, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| match isa {
                Isa::Portable => true,
                Isa::Neon => best == Isa::Neon,
                Isa::Avx2 | Isa::Avx512 => best >= *isa && best != Isa::Neon,
            })
            .collect()
    }

    pub fn parse(name: &str) -> Option<Isa> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "neon" => Some(Isa::Neon),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn best() -> Isa {
        // Every AVX-512 CPU has AVX2, FMA and F16C; the AVX-512 kernels use them too.
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            Isa::Avx512
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn best() -> Isa {
        if std::arch::is_aarch64_feature_detected!("neon") {
            Isa::Neon
        } else {
            Isa::Portable
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn best() -> Isa {
        Isa::Portable
    }
}

/// A row-major weight matrix's elements; half types as their bits, q8_0 and q4k as their
/// blocks (rows whole blocks wide: [`q8_0::fits`], [`q4k::fits`]).
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
    Q8_0(&'a [u8]),
    Q4K(&'a [u8]),
}

impl<'a> Elems<'a> {
    /// Elements `from..to` of a CPU tensor's storage; `None` for other element types.
    pub fn of(storage: &'a candle_core::CpuStorage, from: usize, to: usize) -> Option<Self> {
        use candle_core::CpuStorage;
        use half::slice::HalfFloatSliceExt;
        Some(match storage {
            CpuStorage::F32(v) => Elems::F32(v.get(from..to)?),
            CpuStorage::F16(v) => Elems::F16(v.get(from..to)?.reinterpret_cast()),
            CpuStorage::BF16(v) => Elems::Bf16(v.get(from..to)?.reinterpret_cast()),
            _ => return None,
        })
    }

    /// Weights held (as if dense).
    pub(crate) fn len(&self) -> usize {
        match self {
            Elems::F32(w) => w.len(),
            Elems::F16(w) | Elems::Bf16(w) => w.len(),
            Elems::Q8_0(w) => w.len() / q8_0::BLOCK_BYTES * q8_0::BLOCK_VALUES,
            Elems::Q4K(w) => w.len() / q4k::BLOCK_BYTES * q4k::BLOCK_VALUES,
        }
    }

    /// Bytes of one row of `cols` weights.
    pub(crate) fn row_bytes(&self, cols: usize) -> usize {
        match self {
            Elems::F32(_) => cols * 4,
            Elems::F16(_) | Elems::Bf16(_) => cols * 2,
            Elems::Q8_0(_) => q8_0::row_bytes(cols),
            Elems::Q4K(_) => q4k::row_bytes(cols),
        }
    }
}

/// `out[i] = Σ_j w[first + i][j] · x[j]` for every `i < out.len()`, rows of `x.len()`
/// elements. The caller has checked that those rows lie within `w`.
pub fn dot_rows(isa: Isa, w: Elems<'_>, first: usize, x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    let end = (first + out.len()) * cols;
    debug_assert!(end <= w.len());
    match w {
        Elems::Q8_0(w) => return q8_0::dot_rows(isa, w, first, x, out),
        Elems::Q4K(w) => return q4k::dot_rows(isa, w, first, x, out),
        _ => {}
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => x86::dot_rows(isa, w, first, x, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::dot_rows(w, first, x, out),
        _ => portable_rows(w, first, x, out),
    }
}

/// [`dot_rows`] for four inputs of the same length at once, the outputs equally long:
/// the numbers of four [`dot_rows`] calls, each weight load shared where the CPU has a
/// kernel for it (else it is those four calls).
pub fn dot_rows_4(
    isa: Isa,
    w: Elems<'_>,
    first: usize,
    xs: [&[f32]; 4],
    mut outs: [&mut [f32]; 4],
) {
    let (cols, n) = (xs[0].len(), outs[0].len());
    let even = xs.iter().all(|x| x.len() == cols) && outs.iter().all(|o| o.len() == n);
    debug_assert!(even && (first + n) * cols <= w.len());
    #[cfg(target_arch = "x86_64")]
    if even && x86::dot_rows_4(isa, w, first, xs, &mut outs) {
        return;
    }
    for (x, out) in xs.into_iter().zip(outs) {
        dot_rows(isa, w, first, x, out);
    }
}

/// `out.len()` elements from `from` on, as f32 (F16C where the CPU has it).
pub fn widen(w: Elems<'_>, from: usize, out: &mut [f32]) {
    let to = from + out.len();
    match w {
        Elems::F32(w) => out.copy_from_slice(&w[from..to]),
        Elems::F16(w) => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            let halves: &[half::f16] = w[from..to].reinterpret_cast();
            halves.convert_to_f32_slice(out);
        }
        Elems::Bf16(w) => {
            for (o, &b) in out.iter_mut().zip(&w[from..to]) {
                *o = bf16_to_f32(b);
            }
        }
        Elems::Q8_0(w) => q8_0::widen(w, from, out),
        Elems::Q4K(w) => q4k::widen(w, from, out),
    }
}

/// The reference: a dot product per row, eight partial sums each.
pub fn portable_rows(w: Elems<'_>, first: usize, x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    for (i, o) in out.iter_mut().enumerate() {
        let at = (first + i) * cols;
        *o = match w {
            Elems::F32(w) => portable_dot(&w[at..at + cols], x, |v| v),
            Elems::F16(w) => portable_dot(&w[at..at + cols], x, f16_to_f32),
            Elems::Bf16(w) => portable_dot(&w[at..at + cols], x, bf16_to_f32),
            Elems::Q8_0(w) => {
                q8_0::portable_rows(w, first + i, x, std::slice::from_mut(o));
                continue;
            }
            Elems::Q4K(w) => {
                q4k::portable_rows(w, first + i, x, std::slice::from_mut(o));
                continue;
            }
        };
    }
}

fn portable_dot<T: Copy>(w: &[T], x: &[f32], to_f32: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (wc, xc) in wc.zip(xc) {
        for k in 0..8 {
            acc[k] += to_f32(wc[k]) * xc[k];
        }
    }
    let tail: f32 = wr.iter().zip(xr).map(|(&w, &x)| to_f32(w) * x).sum();
    acc.iter().sum::<f32>() + tail
}

pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}
