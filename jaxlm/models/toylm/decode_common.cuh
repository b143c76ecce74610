// What both CUDA decode kernels share: shapes, the parameters, numeric helpers, RoPE pairs
// and the grid-wide barrier. decode.cu multiplies on the CUDA cores (a few rows),
// decode_mma.cu on the tensor cores (many rows); jaxlm/models/toylm/decode_kernel.py picks one
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
  int steps;                 // decode steps this launch runs (more than one: greedy only)
  const int32_t* tokens;     // [B]  the token fed at the first step
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
  float* logits;             // [B, V]; nullptr: greedy, each step's arg-max goes to greedy_tokens
  int32_t* greedy_tokens;    // [B, steps] greedy: the token chosen at each step
  int eos;                   // greedy: the EOS id (-1: none); a row fed it is fed it again
  unsigned long long* best;  // greedy: [3, B] each row's best argmax_key of a step (workspace)
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


// ------------------------------------------------------------------------------- tokens

// Greedy steps: the token fed at step u > 0 is the arg-max of step u - 1, except that a row fed
// EOS is fed EOS again (generate's rule: a row that produced EOS only repeats it). Each step's
// head reduces every row's arg-max into p.best[u % 3] with atomicMax; a task that needs a fed
// token derives it from there and from the token fed before, so no block waits for another to
// write the tokens out. One writer per row (see record_tokens: a task per m-tile in the
// tensor-core build, block 0 in the CUDA-core one) writes them out and clears the bests of a
// later step: three sets rotate.

// The block's best argmax_key per row so far in a head task.
__shared__ unsigned long long block_best[B];

// The residual stream before layer 0: the fed token's embedding (upcast, scaled).
__device__ __forceinline__ float embedded(const Params& p, int token, int i) {
  return to_f(p.embed[(size_t)token * D + i]) * p.embed_scale;
}

// (logit, id) as one integer ordered like jnp.argmax's choice: the larger logit, and among
// equal logits the smaller id, gives the larger key, so that atomicMax reduces the arg-max.
__device__ __forceinline__ unsigned long long argmax_key(float logit, int id) {
  const uint32_t bits = __float_as_uint(logit), ordered = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  return (unsigned long long)ordered << 32 | (0xffffffffu - (uint32_t)id);
}
__device__ __forceinline__ int argmax_id(unsigned long long key) { return (int)(0xffffffffu - (uint32_t)key); }

// The token row b is fed at step `step` of the launch: the input at step 0; once the heads of
// step - 1 have finished on its m-tile, the rule above.
__device__ __forceinline__ int fed_token(const Params& p, int b, int step) {
  if (step == 0) return p.tokens[b];
  // Volatile: loaded whether or not it is used, so that both loads are in flight at once (faster
  // than loading it only when needed: docs/PERFORMANCE.md).
  const unsigned long long key = *reinterpret_cast<const volatile unsigned long long*>(&p.best[(step - 1) % 3 * B + b]);
  const int before = step == 1 ? p.tokens[b] : p.greedy_tokens[b * p.steps + step - 2];
  return before == p.eos ? p.eos : argmax_id(key);
}

// Greedy, by row b's one writer at step `step`, after the heads of step - 1 on it and before
// the heads of this step: writes out the token chosen at step - 1 (the one fed now) and clears
// the bests of step + 1. Their last readers fed step - 1 (they are the set of step - 2); their
// first writers are the heads of step + 1. The bests of step 0 are cleared by begin_steps.
__device__ __forceinline__ void record_tokens(const Params& p, int b, int step) {
  if (step > 0) p.greedy_tokens[b * p.steps + step - 1] = fed_token(p, b, step);
  p.best[(step + 1) % 3 * B + b] = 0;
}

// Greedy: a candidate for row b's arg-max, into the block's best.
__device__ __forceinline__ void offer_best(int b, unsigned long long key) { atomicMax(&block_best[b], key); }

// Greedy, after a head task: the block's best of rows [first, first + rows) to the grid's.
__device__ __forceinline__ void publish_best(const Params& p, int step, int first, int rows) {
  __syncthreads();
  for (int b = first + threadIdx.x; b < first + rows && b < B; b += THREADS) {
    atomicMax(&p.best[step % 3 * B + b], block_best[b]);
    block_best[b] = 0;
  }
}

// Before the launch's first grid barrier: the bests of step 0 cleared (the workspace is not
// zeroed between launches), and the block's.
__device__ void begin_steps(const Params& p) {
  for (int b = threadIdx.x; b < B; b += THREADS) {
    block_best[b] = 0;
    if (blockIdx.x == 0 && !p.logits) p.best[b] = 0;
  }
  __syncthreads();
}

// Greedy, once the heads of the last step have finished on row b: the token they chose.
__device__ __forceinline__ void record_last_token(const Params& p, int b) {
  p.greedy_tokens[b * p.steps + p.steps - 1] = fed_token(p, b, p.steps);
}


// A logit as ToyLM.decode_step gives it: soft-capped (cap * tanh(logit / cap)) when the model
// caps them. Capping here spares the decode loop a pass over the [B, V] logits.
__device__ __forceinline__ float capped(const Params& p, float logit) {
  return p.logit_cap > 0.f ? p.logit_cap * tanhf(logit / p.logit_cap) : logit;
}

// ------------------------------------------------------------------------------- the step's numerics
// Where both kernels compute the same value, one definition: rounded to T wherever XLA's
// ToyLM.decode_step holds the value in T.

// RoPE on a pair of q or k outputs (already rounded to T), in float32 like layers.rope.
__device__ __forceinline__ void rotate(const Params& p, int b, int time, int i, float& x1, float& x2) {
  float sn, cs;
  sincosf((float)(time - p.starts[b]) * p.inv_freq[i], &sn, &cs);
  const float r1 = round_t(x1 * cs - x2 * sn), r2 = round_t(x2 * cs + x1 * sn);
  x1 = r1, x2 = r2;
}

// Row b's slot at `time` in layer l's cache of head h: keys (which == 1) or values (which == 2).
__device__ __forceinline__ T* cache_slot(const Params& p, int l, int which, int b, int h, int time) {
  const int S = p.cache_size[l];
  return (which == 1 ? p.k_cache[l] : p.v_cache[l]) + (((size_t)b * H + h) * S + time % S) * K;
}

// Whether the key in `slot` of a ring of S slots is visible to the query at `time`: written at
// or after the row's start and, in a sliding layer, within its window.
__device__ __forceinline__ bool key_visible(int time, int slot, int S, int start, int window) {
  const int key_time = time - (time - slot) % S;
  return key_time >= start && (window == 0 || time - key_time < window);
}

// One hidden unit of the MLP product from its gate and up sums: SiLU(gate) * up as jax.nn.silu.
__device__ __forceinline__ T swiglu(float gate_sum, float up_sum) {
  const float gate = round_t(gate_sum), up = round_t(up_sum);
  const float silu = round_t(gate * round_t(1.f / (1.f + expf(-gate))));
  return from_f<T>(silu * up);
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
// all NB blocks have. Every barrier adds NB, so every launch starts the counter at a multiple of
// NB; a block reads it before its own first arrival, when fewer than NB arrivals of this launch
// can have happened (no barrier can open without it). Release/acquire at GPU scope publish each
// block's writes. It is faster than cooperative_groups' grid.sync() (docs/PERFORMANCE.md).
// The launch is still cooperative: that guarantees every block is resident,
// without which a barrier never opens.
__device__ unsigned long long barrier_arrivals;

__device__ __forceinline__ unsigned long long barrier_start() {
  __shared__ unsigned long long start;
  if (threadIdx.x == 0) {
    unsigned long long now;
    asm volatile("ld.relaxed.gpu.u64 %0, [%1];" : "=l"(now) : "l"(&barrier_arrivals));
    start = now - now % NB;
  }
  __syncthreads();
  return start;
}

// A block's writes published with one added to a counter, and the wait for a counter to reach
// a target, after which the writes published with it are visible to the whole block.
__device__ __forceinline__ void signal(unsigned long long* counter) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(counter) : "memory");
}

// Polls are spaced POLL_GAP cycles apart: polls of the line the adds go to slow the adds (the
// gaps tried, and two polls in flight, are measured in docs/PERFORMANCE.md).
constexpr long long POLL_GAP = 100;
__device__ __forceinline__ void wait_until(const unsigned long long* counter, unsigned long long target) {
  if (threadIdx.x == 0) {
    while (true) {
      unsigned long long now;
      asm volatile("ld.acquire.gpu.u64 %0, [%1];" : "=l"(now) : "l"(counter) : "memory");
      if (now >= target) break;
      for (const long long start = clock64(); clock64() - start < POLL_GAP;) {
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void grid_barrier(unsigned long long& target) {
  target += NB;
  signal(&barrier_arrivals);
  wait_until(&barrier_arrivals, target);
}
