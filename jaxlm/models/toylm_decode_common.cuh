// What both CUDA decode kernels share: shapes, the parameters, numeric helpers, RoPE pairs
// and the grid-wide barrier. toylm_decode.cu multiplies on the CUDA cores (a few rows),
// toylm_decode_mma.cu on the tensor cores (many rows); jaxlm/models/toylm_decode.py picks one
// and builds it with the shapes as -D flags.

#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if JAXLM_DTYPE == 1
using T = __nv_bfloat16;
#elif JAXLM_DTYPE == 2
using T = __half;
#else
using T = float;
#endif

constexpr int B = JAXLM_B;            // rows decoded together
constexpr int D = JAXLM_D;            // model width
constexpr int H = JAXLM_H;            // heads
constexpr int K = JAXLM_K;            // head dim
constexpr int F = JAXLM_F;            // MLP hidden width
constexpr int V = JAXLM_V;            // vocabulary
constexpr int L = JAXLM_L;            // layers
constexpr int NB = JAXLM_BLOCKS;      // blocks: one per multiprocessor, all resident
constexpr bool INTERLEAVED = JAXLM_INTERLEAVED;   // RoPE pairs 2i, 2i+1 (else i, i + K/2)

constexpr int THREADS = 256, WARPS = THREADS / 32, TW = NB * WARPS;   // TW: warps in the grid
constexpr int VEC = 16 / sizeof(T);                  // elements in one 16-byte load
constexpr int PART = K + 2;                          // an attention split's partial: max, sum, K outputs
constexpr int KL = (K + 31) / 32;                    // head dims per lane

static_assert(D == H * K && K % 2 == 0, "ToyLM shapes");

struct Params {
  const int32_t* tokens;     // [B]  the token fed at this step
  const int32_t* time;       // []   its time (cache.length)
  const int32_t* starts;     // [B]  each row's first real time
  const float* inv_freq;     // [K/2] RoPE frequencies, as layers.rope computes them
  const T* embed;            // [V, D] (also the tied head)
  const float* attn_norm;    // [L, D]
  const T* wqkv;             // [L, 3D, D]
  const T* wo;               // [L, D, D]
  const float* mlp_norm;     // [L, D]
  const T* wgu;              // [L, 2F, D]  gate rows, then up rows
  const T* wdown;            // [L, D, F]
  const float* final_norm;   // [D]
  T* k_cache[L];             // [B, H, S_l, K]
  T* v_cache[L];
  int cache_size[L];
  int window[L];             // keys visible within this many times; 0: global layer
  float* ws;                 // workspace
  float* logits;             // [B, V]
  float eps, embed_scale, attn_scale;
  float logit_cap;           // the head's soft-cap; 0: none
};

// ------------------------------------------------------------------------------- helpers

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename U> __device__ __forceinline__ U from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
// The value as the XLA path holds it in the compute dtype.
__device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[VEC]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(e[i]);
}


// The residual stream before layer 0: the token's embedding (upcast, scaled).
__device__ __forceinline__ float embedded(const Params& p, int b, int i) {
  return to_f(p.embed[(size_t)p.tokens[b] * D + i]) * p.embed_scale;
}


// A logit as ToyLM.decode_step gives it: soft-capped (cap * tanh(logit / cap)) when the model
// caps them. Capping here spares the decode loop a pass over the [B, V] logits.
__device__ __forceinline__ float capped(const Params& p, float logit) {
  return p.logit_cap > 0.f ? p.logit_cap * tanhf(logit / p.logit_cap) : logit;
}

__device__ __forceinline__ const uint4* row_of(const T* matrix, size_t row, int length) {
  return reinterpret_cast<const uint4*>(matrix + row * length);
}

// A RoPE pair of Q/K/V outputs: which of q, k, v (0, 1, 2), its head, frequency, two dims.
struct Pair {
  int which, h, i, d1, d2;
  __device__ __forceinline__ explicit Pair(int pair) {
    which = pair / (D / 2);
    const int within = pair % (D / 2);
    h = within / (K / 2), i = within % (K / 2);
    d1 = INTERLEAVED ? h * K + 2 * i : h * K + i;
    d2 = INTERLEAVED ? d1 + 1 : d1 + K / 2;
  }
};

// ------------------------------------------------------------------------------- grid barrier

// The grid-wide barrier: each block adds one to a counter that is never reset and waits until
// all NB blocks have. A launch passes BARRIERS of them, so every launch starts the counter at a
// multiple of NB * BARRIERS (a block reads it before its first arrival, when no block can have
// passed a barrier yet). Release/acquire at GPU scope publish each block's writes. On an H200
// the step took 227 us with it, 236 with cooperative_groups' grid.sync(). The launch is still
// cooperative: that guarantees every block is resident, without which a barrier never opens.
constexpr unsigned long long BARRIERS = 5 * L;
__device__ unsigned long long barrier_arrivals;

__device__ __forceinline__ unsigned long long barrier_start() {
  __shared__ unsigned long long start;
  if (threadIdx.x == 0) {
    unsigned long long now;
    asm volatile("ld.relaxed.gpu.u64 %0, [%1];" : "=l"(now) : "l"(&barrier_arrivals));
    start = now - now % (NB * BARRIERS);
  }
  __syncthreads();
  return start;
}

// The barrier in two halves, so that a block can issue loads that do not depend on the other
// blocks (weights, old cache slots) between them and overlap their latency with the barrier's.
__device__ __forceinline__ void barrier_arrive(unsigned long long& target) {
  __syncthreads();
  target += NB;
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(&barrier_arrivals) : "memory");
  }
}

__device__ __forceinline__ void barrier_wait(unsigned long long target) {
  if (threadIdx.x == 0) {
    unsigned long long now;
    do {
      asm volatile("ld.acquire.gpu.u64 %0, [%1];" : "=l"(now) : "l"(&barrier_arrivals) : "memory");
    } while (now < target);
  }
  __syncthreads();
}

__device__ __forceinline__ void grid_barrier(unsigned long long& target) {
  barrier_arrive(target);
  barrier_wait(target);
}
