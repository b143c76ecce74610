// One ToyLM decode step for many rows as a single persistent CUDA kernel, its products on the
// tensor cores.
//
// Why: decode.cu multiplies every row on the CUDA cores, which pays for a row or two only.
// More rows need the tensor cores, and at batch 64 XLA's step (~150 kernels) is again a chain of
// launches. This build is also the faster at one row (docs/PERFORMANCE.md). It runs
// the same five phases a layer as decode.cu, with the same numerics. It differs in how it
// computes:
//   - products: mma.sync m16n8k16. A block takes a task, 16 rows (an m-tile) by a group of
//     outputs. Each warp takes one or two n-tiles of 8 outputs over a share of the inputs (a
//     k-split). The block adds the k-splits in a fixed order: deterministic, no atomics.
//   - attention: a lane per cache slot for the scores, then a lane per pair of head dims for
//     the values; a few warps share a (row, head) and merge in shared memory.
//   - synchronisation: the phases meet per m-tile, not at grid barriers (see Progress), also
//     from a greedy step's head to the next step; one grid barrier starts the launch.
//
// Operand order: the weights stay [out, in], as decode_kernel.py prepares them for both kernels.
// A lane reads 8 consecutive inputs (16 bytes) of a weight row and of an activation row at the
// same offset and feeds them to two mma k-steps. This permutes the inputs within every 32, the
// same way for both operands, so each dot product is unchanged.

#include "decode_common.cuh"

static_assert(sizeof(T) == 2, "the tensor-core products take bfloat16 or float16");
static_assert(D % 32 == 0 && F % 64 == 0 && V % 128 == 0, "inputs in 32s, outputs in tiles");
static_assert(K % 8 == 0 && K / 8 <= WARPS, "a head's outputs are at most one n-tile per warp");
static_assert(16 % WARPS == 0 && THREADS == 16 * 16, "whole rows of an m-tile per warp; a thread per output of a 16-wide task");

constexpr int MT = (B + 15) / 16;   // m-tiles; rows past B are zeros, their results dropped
static_assert(MT <= NB, "a block per m-tile for the last greedy tokens");

// The most k-splits (a power of two) with NT * KS warps at most and whole 32-input chunks.
constexpr int k_splits(int nt, int kd) {
  int s = 1;
  while (nt * s * 2 <= WARPS && kd % (32 * s * 2) == 0) s *= 2;
  return s;
}

// One phase's product: KD inputs; a task has NT n-tiles a warp's worth of outputs (NPW n-tiles
// each); the NT * KS warps each take CH chunks of 32 inputs. The activations' shared-memory rows
// are STRIDE elements, 64 bytes past a multiple of 128, so that the 16-byte reads of 8 rows by a
// quarter warp hit distinct banks.
template <int KD_, int NPW_, int NT_>
struct Gemm {
  static constexpr int KD = KD_, NPW = NPW_, NT = NT_, KS = k_splits(NT_, KD_), CH = KD / 32 / KS;
  static constexpr int STRIDE = (KD + 63) / 64 * 64 + 32;
};

using QkvGemm = Gemm<D, 1, K / 8>;                               // a task: one head of q, k or v
using OGemm = Gemm<D, 1, 2>;                                     // 16 outputs: one per thread of a task
using GateUpGemm = Gemm<D, 2, (F / 8 < WARPS ? F / 8 : WARPS)>;  // a warp: 8 units' gate and up
using DownGemm = Gemm<F, 1, 2>;                                  // 16 outputs
using HeadGemm = Gemm<D, 2, WARPS>;                              // 128 vocabulary entries

// Workspace (float32 words): residual x [B, D], rotated queries [B, D], the attention output
// [B, D] in T, the MLP product [B, F] in T, the greedy bests [3, B] in 64 bits.
constexpr int WS_X = 0, WS_Q = WS_X + B * D, WS_ATT = WS_Q + B * D, WS_HID = WS_ATT + B * D / 2;
constexpr int WS_BEST = WS_HID + B * F / 2, WS_FLOATS = WS_BEST + 3 * B * 2;
static_assert(WS_BEST % 2 == 0, "64-bit aligned bests");

// Shared memory (float words): an m-tile of activations, the warps' products, attention partials
// and each warp's query.
constexpr int A_STRIDE = DownGemm::STRIDE > QkvGemm::STRIDE ? DownGemm::STRIDE : QkvGemm::STRIDE;
constexpr int SM_A = 0, SM_RED = SM_A + 16 * A_STRIDE / 2, SM_PART = SM_RED + WARPS * 2 * 128;
constexpr int SM_Q = SM_PART + WARPS * PART, SMEM_BYTES = (SM_Q + WARPS * K) * 4;

// ------------------------------------------------------------------------------- m-tile progress

// Phases meet per m-tile instead of at grid barriers. A row's data (its residual, query, cache
// rows, attention output, MLP product) is written and read only by tasks of its own m-tile, so a
// task needs only the tasks of the phase before on its m-tile to have finished, and m-tiles do
// not wait for each other. Each m-tile counts its finished tasks in a counter that is never
// reset. Every phase has the same number of tasks on each m-tile, so one count, `before`, the
// same in every block, says how many must have finished (since the launch) when a phase's task
// starts.
struct alignas(128) TileCounter {   // a line each: the m-tiles' polls and adds do not contend
  unsigned long long finished;
};
__device__ TileCounter tile_counters[MT];
__shared__ unsigned long long tile_start[MT];   // each counter at the launch's start

struct Progress {
  unsigned long long before = 0;

  // Before the launch's first grid barrier, when no task of it can have finished.
  __device__ void start() {
    for (int m = threadIdx.x; m < MT; m += THREADS)
      asm volatile("ld.relaxed.gpu.u64 %0, [%1];" : "=l"(tile_start[m]) : "l"(&tile_counters[m].finished));
  }
  // Until the tasks of the phases before on m-tile m have finished.
  __device__ void wait(int m) const { wait_until(&tile_counters[m].finished, tile_start[m] + before); }
  // The block's task on m-tile m has finished (every thread's writes are published).
  __device__ void finished(int m) const { signal(&tile_counters[m].finished); }
  __device__ void next_phase(int tasks_per_m) { before += tasks_per_m; }
};

// ------------------------------------------------------------------------------- products

__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
#if JAXLM_DTYPE == 1
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// A warp's weights for one task, in registers: NPW n-tiles (8 rows each) by CH chunks of 32
// inputs. Lane (g, t) = (lane / 4, lane % 4) holds inputs 8t..8t+7 of row g of every chunk.
template <class G>
struct WarpTiles {
  uint4 w[G::NPW][G::CH];

  // tile(j) -> the first row of n-tile j at the warp's first input (nullptr: an idle warp).
  template <typename TileOf>
  __device__ __forceinline__ void load(TileOf tile) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < G::NPW; ++j) {
      const T* row = tile(j);
#pragma unroll
      for (int ch = 0; ch < G::CH; ++ch)
        w[j][ch] = row ? __ldg(reinterpret_cast<const uint4*>(row + (size_t)g * G::KD + ch * 32 + t * 8))
                       : make_uint4(0, 0, 0, 0);
    }
  }

  // c[j] = the 16 activation rows (shared, from the warp's first input) times n-tile j. The two
  // k-steps of a chunk go to two accumulators: half as long a chain of dependent mma.
  __device__ __forceinline__ void multiply(const T* a, float (&c)[G::NPW][4]) const {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float odd[G::NPW][4] = {};
#pragma unroll
    for (int ch = 0; ch < G::CH; ++ch) {
      const uint4 lo = *reinterpret_cast<const uint4*>(a + g * G::STRIDE + ch * 32 + t * 8);
      const uint4 hi = *reinterpret_cast<const uint4*>(a + (g + 8) * G::STRIDE + ch * 32 + t * 8);
#pragma unroll
      for (int j = 0; j < G::NPW; ++j) {
        mma(c[j], lo.x, hi.x, lo.y, hi.y, w[j][ch].x, w[j][ch].y);
        mma(odd[j], lo.z, hi.z, lo.w, hi.w, w[j][ch].z, w[j][ch].w);
      }
    }
#pragma unroll
    for (int j = 0; j < G::NPW; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[j][i] += odd[j][i];
  }
};

// Runs one product phase: tasks (m-tile, n) for n < per_m, in contiguous ranges per block (so a
// block mostly keeps its m-tile staged). A task issues its weight loads, which depend on no
// other task, before it waits for its m-tile's inputs (`progress`), so that their latency
// overlaps the wait.
//   tile(n, nt, j)  -> the first weight row of the warp's n-tile j (input 0)
//   stage(m, a)     -> writes the m-tile's 16 activation rows to shared a (row stride STRIDE)
//   early(m, n)     -> a float each thread needs in finish, loaded before the product so that
//                      its latency overlaps it (the residual a projection is added to)
//   finish(m, n, sum, early) with sum(r, nt, j, c): the product at row r, output c of n-tile (nt, j)
template <class G, typename TileOf, typename Stage, typename Early, typename Finish>
__device__ __forceinline__ void gemm_phase(int per_m, float* sm, Progress& progress, TileOf tile, Stage stage,
                                           Early early, Finish finish) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nt = warp % G::NT, ks = warp / G::NT;
  const bool active = warp < G::NT * G::KS;
  T* a = reinterpret_cast<T*>(sm + SM_A);
  float* red = sm + SM_RED;
  const int tasks = MT * per_m, first = blockIdx.x * tasks / NB, last = (blockIdx.x + 1) * tasks / NB;
  int staged = -1, ready = -1;
  for (int task = first; task < last; ++task) {   // block-uniform
    const int m = task / per_m, n = task % per_m;
    WarpTiles<G> w;   // issued first: their latency overlaps the wait and the staging
    w.load([&](int j) -> const T* { return active ? tile(n, nt, j) + ks * G::CH * 32 : nullptr; });
    if (m != ready) progress.wait(m), ready = m;
    const float early_value = early(m, n);
    if (m != staged) {   // (the previous task is done with a and red: see progress.finished)
      stage(m, a);
      __syncthreads();
      staged = m;
    }
    if (active) {
      float c[G::NPW][4] = {};
      w.multiply(a + ks * G::CH * 32, c);
      const int g = lane / 4, t = lane % 4;
#pragma unroll
      for (int j = 0; j < G::NPW; ++j) {
        float* out = red + ((ks * G::NT + nt) * G::NPW + j) * 128;
        *reinterpret_cast<float2*>(out + g * 8 + t * 2) = make_float2(c[j][0], c[j][1]);
        *reinterpret_cast<float2*>(out + (g + 8) * 8 + t * 2) = make_float2(c[j][2], c[j][3]);
      }
    }
    __syncthreads();
    finish(m, n, [&](int r, int tile_nt, int j, int c) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < G::KS; ++k) s += red[((k * G::NT + tile_nt) * G::NPW + j) * 128 + r * 8 + c];
      return s;
    }, early_value);
    progress.finished(m);
  }
  progress.next_phase(per_m);
}

struct NothingEarly {
  __device__ float operator()(int, int) const { return 0.f; }
};

// Stages a[r][i] = RMSNorm(x[16m + r]) * w, rounded to T as the projections see it; x is the
// residual stream, or at fed_step >= 0 (layer 0) the embedding of the token fed at that step. A
// warp takes rows warp, warp + WARPS, ...: their loads are all issued before the first reduction.
template <int STRIDE>
__device__ void stage_normed(const Params& p, int fed_step, const float* norm_w, int m, T* a) {
  constexpr int RPW = 16 / WARPS, CPL = (D / VEC + 31) / 32;   // rows per warp, 16-byte chunks of T per lane
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float v[RPW][CPL][VEC];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int b = 16 * m + warp + rr * WARPS, token = fed_step >= 0 && b < B ? fed_token(p, b, fed_step) : 0;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int i0 = (lane + 32 * c) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (b < B && i0 < D) {
          x = fed_step >= 0 ? make_float4(embedded(p, token, i0 + e), embedded(p, token, i0 + e + 1),
                                          embedded(p, token, i0 + e + 2), embedded(p, token, i0 + e + 3))
                            : *reinterpret_cast<const float4*>(p.ws + WS_X + b * D + i0 + e);
        }
        v[rr][c][e] = x.x, v[rr][c][e + 1] = x.y, v[rr][c][e + 2] = x.z, v[rr][c][e + 3] = x.w;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    float squares = 0.f;
#pragma unroll
    for (int c = 0; c < CPL; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) squares += v[rr][c][e] * v[rr][c][e];
    const float inv_rms = rsqrtf(warp_sum(squares) / D + p.eps);
    const int r = warp + rr * WARPS;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int i0 = (lane + 32 * c) * VEC;
      if (i0 >= D) break;
      uint4 packed;
      T* out = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = from_f<T>(v[rr][c][e] * inv_rms * norm_w[i0 + e]);
      *reinterpret_cast<uint4*>(a + r * STRIDE + i0) = packed;
    }
  }
}

// Stages rows 16m.. of a [B, KD] matrix of T from the workspace (written in this launch: plain
// loads, not the read-only cache).
template <int KD, int STRIDE>
__device__ void stage_rows(const T* src, int m, T* a) {
  constexpr int CPR = KD / VEC;
#pragma unroll 4
  for (int e = threadIdx.x; e < 16 * CPR; e += THREADS) {
    const int r = e / CPR, c = e % CPR, b = 16 * m + r;
    const uint4 v = b < B ? reinterpret_cast<const uint4*>(src + (size_t)b * KD)[c] : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(a + r * STRIDE + c * VEC) = v;
  }
}

// ------------------------------------------------------------------------------- phases

// 1. A task is one head of q, k or v for an m-tile: RMSNorm, the head's K outputs, RoPE; q to
// the workspace, k and v into the cache. Greedy, layer 0's first task of an m-tile records its
// rows' tokens (record_tokens).
__device__ void qkv_phase(const Params& p, int l, int step, int time, float* sm, Progress& progress) {
  using G = QkvGemm;
  const T* w = p.wqkv + (size_t)l * 3 * D * D;
  gemm_phase<G>(
      3 * H, sm, progress, [&](int n, int nt, int) { return w + (size_t)(n * K + nt * 8) * D; },
      [&](int m, T* a) { stage_normed<G::STRIDE>(p, l == 0 ? step : -1, p.attn_norm + l * D, m, a); },
      NothingEarly{},
      [&](int m, int n, auto sum, float) {
        if (l == 0 && n == 0 && !p.logits && threadIdx.x < 16 && 16 * m + threadIdx.x < B)
          record_tokens(p, 16 * m + threadIdx.x, step);
        const int which = n / H, h = n % H;
        for (int e = threadIdx.x; e < 16 * K / 2; e += THREADS) {
          const int r = e / (K / 2), i = e % (K / 2), b = 16 * m + r;
          if (b >= B) continue;
          const int d1 = INTERLEAVED ? 2 * i : i, d2 = INTERLEAVED ? d1 + 1 : d1 + K / 2;
          float x1 = round_t(sum(r, d1 / 8, 0, d1 % 8)), x2 = round_t(sum(r, d2 / 8, 0, d2 % 8));
          if (which < 2) rotate(p, b, time, i, x1, x2);
          if (which == 0) {
            p.ws[WS_Q + b * D + h * K + d1] = x1;
            p.ws[WS_Q + b * D + h * K + d2] = x2;
          } else {
            T* slot = cache_slot(p, l, which, b, h, time);
            slot[d1] = from_f<T>(x1);
            slot[d2] = from_f<T>(x2);
          }
        }
      });
}

// Attention of row b, head h over the slots [lo, hi): a running max, the sum of exponentials
// and the weighted sum of values (head dims 2d, 2d+1 for d = lane + 32j). A chunk of 32 slots
// is loaded into registers at once, its keys a lane per slot and its values a lane per pair of
// dims: one round trip to memory per chunk, not one per slot. (Two chunks in flight spill
// registers.)
constexpr int KP = (K / 2 + 31) / 32;   // pairs of head dims per lane
__device__ __forceinline__ float2 unpack2(uint32_t raw) {
  const T* e = reinterpret_cast<const T*>(&raw);
  return make_float2(to_f(e[0]), to_f(e[1]));
}

struct Chunk {
  uint4 key[K / VEC];        // this lane's slot
  uint32_t value[32][KP];    // every slot, this lane's pairs of dims

  // Slots past hi are loaded clamped to the last one; attend gives them probability 0.
  __device__ __forceinline__ void load(const T* keys, const T* values, int s0, int hi) {
    const int lane = threadIdx.x % 32, slot = min(s0 + lane, hi - 1);
#pragma unroll
    for (int c = 0; c < K / VEC; ++c) key[c] = reinterpret_cast<const uint4*>(keys + (size_t)slot * K)[c];
#pragma unroll
    for (int s = 0; s < 32; ++s)
#pragma unroll
      for (int j = 0; j < KP; ++j)
        value[s][j] = *reinterpret_cast<const uint32_t*>(values + (size_t)min(s0 + s, hi - 1) * K +
                                                         min(2 * (lane + 32 * j), K - 2));
  }
};

struct Attention {
  const Params& p;
  int time, S, window, start, hi;
  const float* q;      // the rotated query, in shared memory (a broadcast read; registers are short)
  float run_max = -1e30f, total = 0.f, acc[KP][2] = {};

  __device__ __forceinline__ void add(const Chunk& chunk, int s0) {
    const int lane = threadIdx.x % 32, slot = min(s0 + lane, hi - 1);
    const bool visible = s0 + lane < hi && key_visible(time, slot, S, start, window);
    float score = 0.f;
#pragma unroll
    for (int c = 0; c < K / VEC; ++c) {
      float k[VEC];
      unpack(chunk.key[c], k);
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        const float4 qe = *reinterpret_cast<const float4*>(q + c * VEC + e);
        score = fmaf(qe.x, k[e], fmaf(qe.y, k[e + 1], fmaf(qe.z, k[e + 2], fmaf(qe.w, k[e + 3], score))));
      }
    }
    score *= p.attn_scale;
    float chunk_max = visible ? score : -1e30f;
#pragma unroll
    for (int o = 16; o; o >>= 1) chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
    const float new_max = fmaxf(run_max, chunk_max), rescale = expf(run_max - new_max);
    const float prob = visible ? expf(score - new_max) : 0.f;
    total = total * rescale + warp_sum(prob);
#pragma unroll
    for (int j = 0; j < KP; ++j) acc[j][0] *= rescale, acc[j][1] *= rescale;
#pragma unroll
    for (int s = 0; s < 32; ++s) {
      const float ps = __shfl_sync(0xffffffffu, prob, s);
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const float2 v = unpack2(chunk.value[s][j]);
        acc[j][0] = fmaf(ps, v.x, acc[j][0]);
        acc[j][1] = fmaf(ps, v.y, acc[j][1]);
      }
    }
    run_max = new_max;
  }
};

// A warp's attention over the slots [lo, a.hi) of its head's keys and values; `query` is the
// rotated query in the workspace, `q` the warp's shared copy; `chunk` may hold the first chunk
// already (`loaded`).
__device__ __forceinline__ void attend(Attention& a, const T* keys, const T* values, int lo, const float* query,
                                       float* q, Chunk& chunk, bool loaded) {
  for (int d = threadIdx.x % 32; d < K; d += 32) q[d] = query[d];
  __syncwarp();
  a.q = q;
  for (int s0 = lo; s0 < a.hi; s0 += 32, loaded = false) {
    if (!loaded) chunk.load(keys, values, s0, a.hi);
    a.add(chunk, s0);
  }
}

// 2. Attention of every (row, head) over the slots written so far. SPLITS warps of a block share
// a (row, head), each a range of slots; the block merges them and writes the output in T. A
// block's PER_BLOCK pairs at a time lie in one m-tile: a task of its progress.
constexpr int SPLITS = [] {
  int s = 1;
  while (s * 2 <= WARPS && B * H * s * 2 <= TW) s *= 2;
  return s;
}();
__device__ void attention_phase(const Params& p, int l, int time, float* sm, Progress& progress) {
  constexpr int PER_BLOCK = WARPS / SPLITS;   // (row, head) pairs a block takes at a time
  static_assert(16 * H % PER_BLOCK == 0, "a block's pairs in one m-tile");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, S = p.cache_size[l], n = min(time + 1, S);
  float* part = sm + SM_PART;
  T* out = reinterpret_cast<T*>(p.ws + WS_ATT);
  int ready = -1;
  // Over the padding rows of the last m-tile too (no work), so that every m-tile has as many tasks.
  for (int base = blockIdx.x * PER_BLOCK; base < MT * 16 * H; base += NB * PER_BLOCK) {   // block-uniform
    const int m = base / (16 * H), pair = base + warp / SPLITS, split = warp % SPLITS, b = pair / H;
    const int lo = split * n / SPLITS;
    Attention a{p, time, S, p.window[l], b < B ? p.starts[b] : 0, (split + 1) * n / SPLITS, nullptr};
    const T* keys = p.k_cache[l] + (size_t)pair * S * K;   // pair = b * H + head
    const T* values = p.v_cache[l] + (size_t)pair * S * K;
    // The slots written before this step do not depend on the Q/K/V phase: the first chunk is
    // loaded before the wait, unless it holds this step's slot.
    Chunk chunk;
    const bool early = pair < B * H && lo < a.hi && (time % S < lo || time % S >= min(lo + 32, a.hi));
    if (early) chunk.load(keys, values, lo, a.hi);
    if (m != ready) progress.wait(m), ready = m;
    if (pair < B * H) attend(a, keys, values, lo, p.ws + WS_Q + b * D + pair % H * K, sm + SM_Q + warp * K, chunk, early);
    float* mine = part + warp * PART;
    if (lane == 0) mine[0] = a.run_max, mine[1] = a.total;
#pragma unroll
    for (int j = 0; j < KP; ++j) {
      const int d = 2 * (lane + 32 * j);
      if (d < K) mine[2 + d] = a.acc[j][0], mine[3 + d] = a.acc[j][1];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < PER_BLOCK * K; e += THREADS) {
      const int local = e / K, d = e % K, pr = base + local;
      if (pr >= B * H) continue;
      const float* splits = part + local * SPLITS * PART;
      float m = -1e30f, sum = 0.f, weighted = 0.f;
      for (int s = 0; s < SPLITS; ++s) m = fmaxf(m, splits[s * PART]);
      for (int s = 0; s < SPLITS; ++s) {
        const float scale = expf(splits[s * PART] - m);
        sum += scale * splits[s * PART + 1];
        weighted += scale * splits[s * PART + 2 + d];
      }
      out[(pr / H) * D + (pr % H) * K + d] = from_f<T>(sum > 0.f ? weighted / sum : 0.f);
    }
    progress.finished(m);   // its __syncthreads also frees part for the next pairs
  }
  progress.next_phase(16 * H / PER_BLOCK);
}

// The value a task's output is added to, loaded early (see gemm_phase): thread r * 16 + c owns
// output c of row 16m + r; before layer 0's O projection (fed_step >= 0) the embedding of the
// token fed, else the residual stream.
struct ResidualBefore {
  const Params& p;
  int fed_step;
  __device__ float operator()(int m, int n) const {
    const int b = 16 * m + threadIdx.x / 16, j = n * 16 + threadIdx.x % 16;
    return b >= B ? 0.f : fed_step >= 0 ? embedded(p, fed_token(p, b, fed_step), j) : p.ws[WS_X + b * D + j];
  }
};
struct AddToResidual {
  const Params& p;
  template <typename Sum>
  __device__ void operator()(int m, int n, Sum sum, float x) const {
    const int r = threadIdx.x / 16, c = threadIdx.x % 16, b = 16 * m + r;
    if (b < B) p.ws[WS_X + b * D + n * 16 + c] = x + round_t(sum(r, c / 8, 0, c % 8));
  }
};

// O and down alike: the product of an activation in the workspace ([B, KD] in T), its D
// outputs added to the residual stream (onto the fed tokens' embedding at layer 0's O projection:
// fed_step >= 0).
template <class G>
__device__ __forceinline__ void residual_projection(const Params& p, const T* w, const float* activation, int fed_step,
                                                    float* sm, Progress& progress) {
  gemm_phase<G>(
      D / (8 * G::NT), sm, progress, [&](int n, int nt, int) { return w + (size_t)(n * G::NT + nt) * 8 * G::KD; },
      [&](int m, T* a) { stage_rows<G::KD, G::STRIDE>(reinterpret_cast<const T*>(activation), m, a); },
      ResidualBefore{p, fed_step}, AddToResidual{p});
}

// 3. O projection of the attention output, added to the residual stream.
__device__ void o_phase(const Params& p, int l, int step, float* sm, Progress& progress) {
  residual_projection<OGemm>(p, p.wo + (size_t)l * D * D, p.ws + WS_ATT, l == 0 ? step : -1, sm, progress);
}

// 4. RMSNorm, then gate and up of 8 * NT hidden units; SiLU(gate) * up to the workspace.
__device__ void gate_up_phase(const Params& p, int l, float* sm, Progress& progress) {
  using G = GateUpGemm;
  const T* w = p.wgu + (size_t)l * 2 * F * D;
  T* hid = reinterpret_cast<T*>(p.ws + WS_HID);
  gemm_phase<G>(
      F / (8 * G::NT), sm, progress,
      [&](int n, int nt, int j) { return w + (size_t)(j * F + (n * G::NT + nt) * 8) * D; },
      [&](int m, T* a) { stage_normed<G::STRIDE>(p, -1, p.mlp_norm + l * D, m, a); },
      NothingEarly{},
      [&](int m, int n, auto sum, float) {
        for (int e = threadIdx.x; e < 16 * G::NT * 8; e += THREADS) {
          const int r = e / (G::NT * 8), c = e % (G::NT * 8), b = 16 * m + r;
          if (b >= B) continue;
          hid[b * F + n * G::NT * 8 + c] = swiglu(sum(r, c / 8, 0, c % 8), sum(r, c / 8, 1, c % 8));
        }
      });
}

// 5. Down projection of the MLP product, added to the residual stream.
__device__ void down_phase(const Params& p, int l, float* sm, Progress& progress) {
  residual_projection<DownGemm>(p, p.wdown + (size_t)l * D * F, p.ws + WS_HID, -1, sm, progress);
}

// 6. Final RMSNorm and the tied head: float32 logits, or (greedy) the task's best per row,
// published into the step's bests before the task counts as finished.
__device__ void head_phase(const Params& p, int step, float* sm, Progress& progress) {
  using G = HeadGemm;
  constexpr int COLS = 8 * G::NT * G::NPW;
  static_assert(COLS / 8 * 16 == THREADS, "greedy: a thread per row and n-tile");
  gemm_phase<G>(
      V / COLS, sm, progress, [&](int n, int nt, int j) { return p.embed + (size_t)(n * COLS + (nt * G::NPW + j) * 8) * D; },
      [&](int m, T* a) { stage_normed<G::STRIDE>(p, -1, p.final_norm, m, a); },
      NothingEarly{},
      [&](int m, int n, auto sum, float) {
        if (p.logits) {
          for (int e = threadIdx.x; e < 16 * COLS; e += THREADS) {
            const int r = e / COLS, c = e % COLS, b = 16 * m + r, tile = c / 8;
            if (b < B) p.logits[(size_t)b * V + n * COLS + c] = capped(p, sum(r, tile / G::NPW, tile % G::NPW, c % 8));
          }
          return;
        }
        // Thread (tile, r) takes the 8 ids of n-tile `tile` in row r: its own maximum, then one
        // shuffle (lanes r and r + 16) and a shared atomic per warp and row, rather than a
        // warp-wide reduction per id, which was measurably slower (docs/PERFORMANCE.md).
        const int r = threadIdx.x % 16, tile = threadIdx.x / 16, b = 16 * m + r;
        unsigned long long best = 0;
#pragma unroll
        for (int c = 0; c < 8; ++c)
          best = max(best, argmax_key(capped(p, sum(r, tile / G::NPW, tile % G::NPW, c)), n * COLS + tile * 8 + c));
        best = max(best, __shfl_xor_sync(0xffffffffu, best, 16));
        if (threadIdx.x % 32 < 16 && b < B) offer_best(b, best);
        publish_best(p, step, 16 * m, 16);
      });
}

// ------------------------------------------------------------------------------- the step

__global__ void __launch_bounds__(THREADS, 1) decode_step_kernel(const Params p) {
  extern __shared__ __align__(16) float sm[];
  unsigned long long barrier = barrier_start();
  Progress progress;
  progress.start();
  begin_steps(p);
  grid_barrier(barrier);   // every block has read where the m-tiles' counts start
  for (int step = 0; step < p.steps; ++step) {
    const int time = *p.time + step;
    for (int l = 0; l < L; ++l) {
      qkv_phase(p, l, step, time, sm, progress);
      attention_phase(p, l, time, sm, progress);
      o_phase(p, l, step, sm, progress);
      gate_up_phase(p, l, sm, progress);
      down_phase(p, l, sm, progress);
    }
    head_phase(p, step, sm, progress);
  }
  if (!p.logits && blockIdx.x < MT) {   // the last step's tokens, an m-tile a block
    progress.wait(blockIdx.x);
    if (threadIdx.x < 16 && 16 * blockIdx.x + threadIdx.x < B) record_last_token(p, 16 * blockIdx.x + threadIdx.x);
  }
}

#include "decode_ffi.cuh"
