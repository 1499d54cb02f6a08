// mesh's own CUDA kernels for the batch-1 decode step of a Llama block.
//
// Each one replaces a sequence of generic ops that would read and write the same
// activations several times or launch several kernels for a few kilobytes of work.
// Every kernel has a CPU reference in `reference.rs` that the tests compare against.
// All reductions run in f32 whatever the storage type, as HF's eager path does.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the total. `scratch` holds 32 floats.
__device__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// ---------------------------------------------------------------------------------------
// RMSNorm with an optional residual add, one block per row:
//   sum = x + delta (when delta is given), out = sum / rms(sum) * weight.
// `sum_out` receives the new residual stream, `norm_out` the normalised row. With the add
// fused, the residual stream is read once and written once per block half.
template <typename T>
__device__ void rms_norm_residual(const T *x, const T *delta, const T *weight, T *sum_out,
                                  T *norm_out, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * dim;
    const T *dr = delta ? delta + row * dim : nullptr;
    T *sr = sum_out + row * dim;
    T *nr = norm_out + row * dim;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (dr) v += to_f32(dr[i]);
        // Round the sum to storage precision before squaring, as the unfused ops do.
        T stored = from_f32<T>(v);
        sr[i] = stored;
        v = to_f32(stored);
        sq += v * v;
    }
    const float total = block_sum(sq, scratch);
    const float inv = rsqrtf(total / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        nr[i] = from_f32<T>(to_f32(sr[i]) * inv * to_f32(weight[i]));
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding of one position's q and k (HF's rotate_half layout), with k and v
// written straight into the preallocated cache `[2, kv_heads, max_len, head_dim]` at `pos`.
// `rope` is `[positions, 2, head_dim / 2]` f32: the cosines, then the sines, of a position.
// One block per head (query heads first, then kv heads); one thread per rotated pair.
// Launched twice per step: once over the query heads (into `q_out`), once over the kv
// heads (into the cache), since candle hands an in-place op only one writable tensor.
template <typename T>
__device__ void rope_kv_append(const T *q, const T *k, const T *v, const float *rope,
                               T *q_out, T *cache, int heads, int kv_heads, int head_dim,
                               int max_len, int pos) {
    const int half = head_dim / 2;
    const int h = blockIdx.x;
    const float *c = rope + (size_t)pos * head_dim;
    const float *s = c + half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        if (h < heads) {
            const T *src = q + (size_t)h * head_dim;
            T *dst = q_out + (size_t)h * head_dim;
            const float a = to_f32(src[i]), b = to_f32(src[i + half]);
            dst[i] = from_f32<T>(a * c[i] - b * s[i]);
            dst[i + half] = from_f32<T>(b * c[i] + a * s[i]);
        } else {
            const int kh = h - heads;
            const T *src = k + (size_t)kh * head_dim;
            T *kdst = cache + ((size_t)kh * max_len + pos) * head_dim;
            const float a = to_f32(src[i]), b = to_f32(src[i + half]);
            kdst[i] = from_f32<T>(a * c[i] - b * s[i]);
            kdst[i + half] = from_f32<T>(b * c[i] + a * s[i]);
            const T *vsrc = v + (size_t)kh * head_dim;
            T *vdst = cache + (((size_t)kv_heads + kh) * max_len + pos) * head_dim;
            vdst[i] = vsrc[i];
            vdst[i + half] = vsrc[i + half];
        }
    }
}

// ---------------------------------------------------------------------------------------
// Grouped-query decode attention over the cache, flash-decoding style.
//
// Grid: (kv_heads, chunks). A block reads the keys and values of one kv head for one chunk
// of positions exactly once and scores them against every query head of its group, so no
// `repeat_kv` copy is made and no key is read twice. Each warp walks positions of the
// chunk with an online softmax; warps, then chunks, are merged with the usual
// (max, sum, accumulator) rescaling. Partial results go to `partial`:
//   [heads, chunks, head_dim + 2] floats: accumulator, then max, then sum.
#define ATTN_WARPS 4

// GROUP query heads per kv head and HEAD_DIM are compile-time so the per-lane arrays stay
// in registers; the Rust side picks the instance and falls back to generic ops otherwise.
template <typename T, int GROUP, int HEAD_DIM>
__device__ void gqa_decode_partial(const T *q, const T *cache, float *partial, int kv_heads,
                                   int max_len, int len, int chunk, float scale) {
    constexpr int PER_LANE = (HEAD_DIM + 31) / 32;
    const int kh = blockIdx.x, ci = blockIdx.y, chunks = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int begin = ci * chunk;
    const int end = min(len, begin + chunk);

    float qr[GROUP][PER_LANE];
    float acc[GROUP][PER_LANE];
    float m[GROUP], l[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const T *qh = q + (size_t)(kh * GROUP + g) * HEAD_DIM;
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) {
            const int d = lane + 32 * e;
            qr[g][e] = d < HEAD_DIM ? to_f32(qh[d]) * scale : 0.0f;
            acc[g][e] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const T *keys = cache + (size_t)kh * max_len * HEAD_DIM;
    const T *values = cache + ((size_t)kv_heads + kh) * max_len * HEAD_DIM;
    for (int p = begin + warp; p < end; p += ATTN_WARPS) {
        float kr[PER_LANE], vr[PER_LANE];
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) {
            const int d = lane + 32 * e;
            kr[e] = d < HEAD_DIM ? to_f32(keys[(size_t)p * HEAD_DIM + d]) : 0.0f;
            vr[e] = d < HEAD_DIM ? to_f32(values[(size_t)p * HEAD_DIM + d]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e) dot += qr[g][e] * kr[e];
            const float score = warp_sum(dot);
            const float m_new = fmaxf(m[g], score);
            const float correction = __expf(m[g] - m_new);
            const float w = __expf(score - m_new);
            l[g] = l[g] * correction + w;
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e) acc[g][e] = acc[g][e] * correction + w * vr[e];
            m[g] = m_new;
        }
    }

    // Merge the warps of this block through shared memory, one query head at a time.
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][PER_LANE * 32];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        __syncthreads();
        if (lane == 0) {
            s_m[warp] = m[g];
            s_l[warp] = l[g];
        }
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) s_acc[warp][lane + 32 * e] = acc[g][e];
        __syncthreads();
        if (warp == 0) {
            float mm = -INFINITY;
            for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, s_m[w]);
            float ll = 0.0f;
            float out[PER_LANE];
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e) out[e] = 0.0f;
            for (int w = 0; w < ATTN_WARPS; ++w) {
                // A warp that saw no position holds m = -inf and contributes nothing.
                const float f = (s_m[w] == -INFINITY) ? 0.0f : __expf(s_m[w] - mm);
                ll += s_l[w] * f;
#pragma unroll
                for (int e = 0; e < PER_LANE; ++e) out[e] += s_acc[w][lane + 32 * e] * f;
            }
            const int h = kh * GROUP + g;
            float *dst = partial + ((size_t)h * chunks + ci) * (HEAD_DIM + 2);
#pragma unroll
            for (int e = 0; e < PER_LANE; ++e) {
                if (lane + 32 * e < HEAD_DIM) dst[lane + 32 * e] = out[e];
            }
            if (lane == 0) {
                dst[HEAD_DIM] = mm;
                dst[HEAD_DIM + 1] = ll;
            }
        }
    }
}

// Combine the chunks of each query head: one block per head, one thread per element.
template <typename T>
__device__ void gqa_decode_combine(const float *partial, T *out, int head_dim, int chunks) {
    const int h = blockIdx.x;
    const float *base = partial + (size_t)h * chunks * (head_dim + 2);
    float mm = -INFINITY;
    for (int c = 0; c < chunks; ++c) mm = fmaxf(mm, base[(size_t)c * (head_dim + 2) + head_dim]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            const float *pc = base + (size_t)c * (head_dim + 2);
            const float f = (pc[head_dim] == -INFINITY) ? 0.0f : __expf(pc[head_dim] - mm);
            num += pc[d] * f;
            den += pc[head_dim + 1] * f;
        }
        out[(size_t)h * head_dim + d] = from_f32<T>(num / den);
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU over a fused gate/up projection: each row of `gate_up` holds `width` gate values
// then `width` up values; out = silu(gate) * up. Read once, written once.
template <typename T>
__device__ void swiglu(const T *gate_up, T *out, size_t rows, int width) {
    const size_t n = rows * (size_t)width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / width, col = i % width;
        const T *gate = gate_up + row * 2 * width;
        const float g = to_f32(gate[col]);
        // Rounded to storage precision between the two products, as the unfused ops are.
        const float silu = to_f32(from_f32<T>(g / (1.0f + __expf(-g))));
        out[i] = from_f32<T>(silu * to_f32(gate[width + col]));
    }
}

#define INSTANTIATE(SUFFIX, T)                                                                 \
    extern "C" __global__ void rms_norm_residual_##SUFFIX(                                     \
        const T *x, const T *delta, const T *weight, T *sum_out, T *norm_out, int dim,         \
        float eps) {                                                                           \
        rms_norm_residual<T>(x, delta, weight, sum_out, norm_out, dim, eps);                   \
    }                                                                                          \
    extern "C" __global__ void rope_kv_append_##SUFFIX(                                        \
        const T *q, const T *k, const T *v, const float *rope, T *q_out, T *cache, int heads,  \
        int kv_heads, int head_dim, int max_len, int pos) {                                    \
        rope_kv_append<T>(q, k, v, rope, q_out, cache, heads, kv_heads, head_dim, max_len,     \
                          pos);                                                                \
    }                                                                                          \
    extern "C" __global__ void gqa_decode_combine_##SUFFIX(const float *partial, T *out,      \
                                                            int head_dim, int chunks) {        \
        gqa_decode_combine<T>(partial, out, head_dim, chunks);                                 \
    }                                                                                          \
    extern "C" __global__ void swiglu_##SUFFIX(const T *gate_up, T *out, size_t rows,          \
                                               int width) {                                    \
        swiglu<T>(gate_up, out, rows, width);                                                  \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)

#define ATTENTION(SUFFIX, T, G, D)                                                             \
    extern "C" __global__ void gqa_decode_partial_##SUFFIX##_g##G##_d##D(                     \
        const T *q, const T *cache, float *partial, int kv_heads, int max_len, int len,        \
        int chunk, float scale) {                                                              \
        gqa_decode_partial<T, G, D>(q, cache, partial, kv_heads, max_len, len, chunk, scale);  \
    }
#define ATTENTION_DIMS(SUFFIX, T, G)                                                           \
    ATTENTION(SUFFIX, T, G, 16) ATTENTION(SUFFIX, T, G, 32) ATTENTION(SUFFIX, T, G, 64)       \
        ATTENTION(SUFFIX, T, G, 128)
#define ATTENTION_GROUPS(SUFFIX, T)                                                            \
    ATTENTION_DIMS(SUFFIX, T, 1) ATTENTION_DIMS(SUFFIX, T, 2) ATTENTION_DIMS(SUFFIX, T, 4)     \
    ATTENTION_DIMS(SUFFIX, T, 8)
ATTENTION_GROUPS(f32, float)
ATTENTION_GROUPS(f16, __half)
ATTENTION_GROUPS(bf16, __nv_bfloat16)
