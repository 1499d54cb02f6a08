//! Batch-1 decode timings against the memory-bandwidth floor, shared by the GPU check and
//! the CPU decode bench: model shapes, random weights made in memory or on disk, the
//! device's copy bandwidth, and a timed greedy decode loop.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mesh_core::model::{tiny, ClientHead, LlamaConfig, Quantization, SpanModel, Weights};
use mesh_core::BlockRange;

/// A Llama shape for the decode timings.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl ModelShape {
    /// The CPU decode shape of docs/performance.md: 167 MB of f32 weights touched per
    /// token, two fifths of it the LM head, as in small real models.
    pub const WIDE_512: Self = Self {
        name: "512-wide",
        hidden: 512,
        intermediate: 1376,
        layers: 8,
        heads: 8,
        kv_heads: 8,
        vocab: 32000,
    };
    pub const TINYLLAMA_1_1B: Self = Self {
        name: "TinyLlama-1.1B",
        hidden: 2048,
        intermediate: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        vocab: 32000,
    };
    pub const LLAMA3_8B: Self = Self {
        name: "Llama-3-8B",
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        vocab: 128256,
    };

    pub fn config(&self, max_positions: usize) -> anyhow::Result<LlamaConfig> {
        Ok(LlamaConfig::from_json(&self.config_json(max_positions))?)
    }

    /// `config.json` of this shape.
    pub fn config_json(&self, max_positions: usize) -> String {
        format!(
            r#"{{"model_type":"llama","vocab_size":{},"hidden_size":{},"intermediate_size":{},
            "num_hidden_layers":{},"num_attention_heads":{},"num_key_value_heads":{},
            "max_position_embeddings":{max_positions},"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "hidden_act":"silu","tie_word_embeddings":false}}"#,
            self.vocab, self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads
        )
    }
}

/// Random weights of `cfg`, made directly on `device` (nothing is written to disk).
pub fn random_weights(cfg: &LlamaConfig, device: &Device, dtype: DType) -> anyhow::Result<Weights> {
    Ok(Weights::from_tensors(
        random_tensors(cfg, device, dtype)?,
        dtype,
        device,
    ))
}

/// The tensors of [`random_weights`], by their Hugging Face names.
pub fn random_tensors(
    cfg: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_dim();
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
    let mut map = HashMap::new();
    let mut put = |name: String, shape: &[usize], ones: bool| -> anyhow::Result<()> {
        let t = if ones {
            Tensor::ones(shape, dtype, device)?
        } else {
            (Tensor::randn(0f32, 0.02, shape, device)?).to_dtype(dtype)?
        };
        map.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, h], false)?;
    put("lm_head.weight".into(), &[v, h], false)?;
    put("model.norm.weight".into(), &[h], true)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], true)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], true)?;
        put(format!("{p}.self_attn.q_proj.weight"), &[q, h], false)?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], false)?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], false)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, q], false)?;
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], false)?;
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], false)?;
        put(format!("{p}.mlp.down_proj.weight"), &[h, i], false)?;
    }
    Ok(map)
}

/// Bytes per second the device moves: on a GPU it copies (read + write), from 1 GiB
/// copied repeatedly; on the CPU, [`cpu_bandwidth`] with one thread per core, as the
/// decode path reads with them all.
pub fn copy_bandwidth(device: &Device) -> anyhow::Result<f64> {
    if device.is_cpu() {
        return Ok(cpu_bandwidth(mesh_core::model::matvec::pool().threads()));
    }
    let elems = 1usize << 28; // 1 GiB of f32
    let src = Tensor::zeros(elems, DType::F32, device)?;
    let _warm = src.copy()?;
    device.synchronize()?;
    let rounds = 10;
    let started = Instant::now();
    for _ in 0..rounds {
        let _ = src.copy()?;
    }
    device.synchronize()?;
    Ok(2.0 * (elems * 4 * rounds) as f64 / started.elapsed().as_secs_f64())
}

/// The best of many rounds of `threads` threads each copying (read + write counted) and
/// each reading alone its part of 256 MiB, far past any cache. A shared machine's
/// bandwidth swings from round to round and the floor is what it gives at best; a
/// decode step only reads, and reading can outrun copying, so the better of the two
/// counts. Reading goes through [`read_all`]: the widest vectors with prefetching, as the
/// decode kernels read, since a plain loop leaves this machine's bandwidth unused. Both
/// buffers are written first, so no round pays for page faults.
pub fn cpu_bandwidth(threads: usize) -> f64 {
    let elems = 1usize << 26;
    let src: Vec<f32> = (0..elems).map(|i| (i % 251) as f32).collect();
    let mut dst = vec![2f32; elems];
    let part = elems.div_ceil(threads.max(1));
    let bytes = (elems * 4) as f64;
    let mut best = 0f64;
    for _ in 0..12 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(part).zip(src.chunks(part)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        best = best.max(2.0 * bytes / started.elapsed().as_secs_f64());
        let started = Instant::now();
        let sum = std::thread::scope(|s| {
            let parts: Vec<_> = src
                .chunks(part)
                .map(|c| s.spawn(move || read_all(c)))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or(0.0))
                .sum::<f32>()
        });
        std::hint::black_box(sum);
        best = best.max(bytes / started.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    best
}

/// Every element of `data` read once, summed (so the reads happen): AVX-512 or AVX
/// loads into eight sums with the lines 4 KiB ahead prefetched, where the CPU has them.
pub fn read_all(data: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { read_all_avx512(data) };
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked just above).
            return unsafe { read_all_avx(data) };
        }
    }
    data.iter().sum()
}

/// Elements prefetched ahead of the reads: 4 KiB, a page.
#[cfg(target_arch = "x86_64")]
const READ_AHEAD: usize = 1024;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_all_avx512(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut sums = [_mm512_setzero_ps(); 8];
    let mut chunks = data.chunks_exact(128);
    for (i, chunk) in chunks.by_ref().enumerate() {
        let ahead = data
            .as_ptr()
            .wrapping_add(i * 128 + READ_AHEAD)
            .cast::<i8>();
        for line in 0..8 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        for (k, sum) in sums.iter_mut().enumerate() {
            *sum = _mm512_add_ps(*sum, _mm512_loadu_ps(chunk.as_ptr().add(16 * k)));
        }
    }
    let total = sums
        .iter()
        .fold(_mm512_setzero_ps(), |a, &s| _mm512_add_ps(a, s));
    _mm512_reduce_add_ps(total) + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn read_all_avx(data: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut sums = [_mm256_setzero_ps(); 8];
    let mut chunks = data.chunks_exact(64);
    for (i, chunk) in chunks.by_ref().enumerate() {
        let ahead = data.as_ptr().wrapping_add(i * 64 + READ_AHEAD).cast::<i8>();
        for line in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        for (k, sum) in sums.iter_mut().enumerate() {
            *sum = _mm256_add_ps(*sum, _mm256_loadu_ps(chunk.as_ptr().add(8 * k)));
        }
    }
    let mut lanes = [0f32; 8];
    let total = sums
        .iter()
        .fold(_mm256_setzero_ps(), |a, &s| _mm256_add_ps(a, s));
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// One timed decode run.
#[derive(Clone, Copy, Debug)]
pub struct DecodeTiming {
    pub ms_per_token: f64,
    /// Weights (blocks, final norm, LM head, one embedding row) and KV cache read per token.
    pub bytes_per_token: f64,
    /// On the CPU, the better of the memory bandwidths ([`cpu_bandwidth`]) measured just
    /// before and just after the timed steps, in bytes per second: what memory gave while
    /// they ran, on a machine whose bandwidth swings with its neighbours' load.
    pub bandwidth_around: Option<f64>,
}

impl DecodeTiming {
    /// The bandwidth the decode achieved: its bytes per token over its time per token.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes_per_token / (self.ms_per_token / 1e3) / 1e9
    }
}

/// Batch-1 decode of the whole model on `device`: a `context`-token prefill, then
/// `tokens` steps, each embed → every block → LM head → argmax on the host.
pub fn time_decode(
    shape: ModelShape,
    device: &Device,
    dtype: DType,
    context: usize,
    tokens: usize,
    fused: bool,
    quantize: Option<Quantization>,
) -> anyhow::Result<DecodeTiming> {
    // The prompt, two warm-up steps and the timed ones.
    let max_len = context + 2 + tokens;
    let cfg = shape.config(max_len.max(4096))?;
    let weights = random_weights(&cfg, device, dtype)?;
    let head = ClientHead::from_weights(&cfg, &weights)?;
    let weights = weights.with_quantization(quantize);
    let mut span = SpanModel::from_weights(&cfg, &weights, BlockRange::new(0, cfg.num_blocks()))?;
    drop(weights);
    span.set_fused_decode(fused)?;
    let mut cache = span.new_cache(max_len)?;
    let prompt: Vec<u32> = (0..context as u32).map(|i| 1 + i % 1000).collect();
    let mut next = step(&span, &head, &mut cache, &prompt)?;
    let bandwidth = || {
        device
            .is_cpu()
            .then(|| cpu_bandwidth(mesh_core::model::matvec::pool().threads()))
    };
    let before = bandwidth();
    // Two warm-up steps load every kernel module before the clock starts.
    for _ in 0..2 {
        next = step(&span, &head, &mut cache, &[next])?;
    }
    let started = Instant::now();
    for _ in 0..tokens {
        next = step(&span, &head, &mut cache, &[next])?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let bandwidth_around = before.zip(bandwidth()).map(|(b, a)| b.max(a));
    let (h, v) = (cfg.hidden_size as f64, cfg.vocab_size as f64);
    let kv_bytes = (2 * cfg.num_blocks() as usize * cfg.num_kv_heads() * cfg.head_dim()) as f64
        * (context + 2 + tokens / 2) as f64
        * dtype.size_in_bytes() as f64;
    // The head is in the model's dtype here: one embedding row, the final norm and the
    // whole LM head per token.
    let head_bytes = (v * h + h + h) * dtype.size_in_bytes() as f64;
    Ok(DecodeTiming {
        ms_per_token: seconds * 1e3 / tokens as f64,
        bytes_per_token: span.weight_bytes() as f64 + head_bytes + kv_bytes,
        bandwidth_around,
    })
}

/// Tokens `ids` through the model; the greedy next token (its logits copied to the host,
/// as every generation does, so each step waits for the device).
pub fn step(
    span: &SpanModel,
    head: &ClientHead,
    cache: &mut mesh_core::model::SpanCache,
    ids: &[u32],
) -> anyhow::Result<u32> {
    let start = cache.len();
    let hidden = span.forward(cache, &head.embed(ids)?, start)?;
    Ok(argmax(&head.last_logits(&hidden)?))
}

pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0 as u32
}

/// A model directory for `shape` with random weights (safetensors at `dtype`), its
/// `config.json` and the tiny model's byte-level tokenizer (enough for servers and for
/// clients that feed token ids).
pub fn write_model_dir(
    shape: ModelShape,
    dtype: DType,
    max_positions: usize,
    dir: &Path,
) -> anyhow::Result<()> {
    let cfg = shape.config(max_positions)?;
    let tensors = random_tensors(&cfg, &Device::Cpu, dtype)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), shape.config_json(max_positions))?;
    std::fs::write(dir.join("tokenizer.json"), tiny::tokenizer_json())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::read_all;

    #[test]
    fn reading_all_sums_every_element_once() {
        for len in [0usize, 1, 63, 64, 127, 128, 129, 5000] {
            let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
            let expected: f32 = data.iter().sum();
            assert_eq!(read_all(&data), expected, "{len} elements");
        }
    }
}
