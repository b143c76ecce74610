// One ToyLM decode step (every layer, then the head) as a single persistent CUDA kernel.
//
// Why: the XLA step is a chain of ~150 small dependent kernels, and the chain, not reading the
// weights, bounds it (docs/PERFORMANCE.md, "Generation"). Here one cooperative launch of one block
// per multiprocessor runs five phases a layer, separated by grid-wide barriers:
//   1. RMSNorm, Q/K/V, RoPE; the new key and value stored in the cache
//   2. attention over the written slots, split over blocks (partial softmax sums)
//   3. the splits combined, O projection, residual add
//   4. RMSNorm, gate/up, SiLU * up
//   5. down projection, residual add
// and a last phase: final RMSNorm and the tied head. The numerics follow ToyLM.decode_step:
// the residual stream is float32, and values are rounded to the compute dtype T wherever the
// XLA path holds them in T (projection outputs, RoPE, attention output, the MLP product).
//
// Shapes are compile-time constants (-D flags from jaxlm/models/toylm/decode_kernel.py, which builds
// one library per model shape and batch). Weight matrices come transposed, [out, in], so that
// each output is one warp's dot product over a contiguous row.

#include "decode_common.cuh"

constexpr int NS = NB / (B * H) > 0 ? NB / (B * H) : 1;   // attention splits per (row, head)
constexpr int TASKS = B * H * NS;
// Warps sharing one row of the down projection (its inputs are F long), all in one block.
constexpr int DOWN_PARTS = TW / D >= 8 ? 8 : TW / D >= 4 ? 4 : TW / D >= 2 ? 2 : 1;

static_assert(D % VEC == 0 && F % (VEC * DOWN_PARTS) == 0, "rows must split into 16-byte chunks");
static_assert(B <= 32, "a lane per row in the stores");

// Workspace (float32 words): residual x [B, D], rotated queries [B, D], attention partials
// [TASKS, PART], the MLP product [B, F] in T, the greedy bests [3, B] in 64 bits.
constexpr int WS_X = 0, WS_Q = WS_X + B * D, WS_PART = WS_Q + B * D, WS_HID = (WS_PART + TASKS * PART + 3) / 4 * 4;
constexpr int WS_BEST = (WS_HID + (B * F * (int)sizeof(T) + 3) / 4 + 1) / 2 * 2, WS_FLOATS = WS_BEST + 3 * B * 2;

// Shared memory (float words): the activations a phase multiplies (B rows of D floats, or of
// F elements of T), per-row norms, warp partials of attention, the down projection's parts.
constexpr int ACT_FLOATS = (B * D > (B * F * (int)sizeof(T) + 3) / 4 ? B * D : (B * F * (int)sizeof(T) + 3) / 4);
constexpr int SM_ACT = 0, SM_NORM = ACT_FLOATS, SM_WARP = SM_NORM + B,
              SM_SPLIT = SM_WARP + WARPS * PART, SM_DOWN = SM_SPLIT + TASKS;
constexpr int SMEM_BYTES = (SM_DOWN + WARPS * B) * 4;

// ------------------------------------------------------------------------------- helpers

// VEC activations from shared memory: float32 rows, or (the MLP product) rows of T.
template <typename A>
__device__ __forceinline__ void load_act(const A* a, float (&out)[VEC]) {
  if constexpr (std::is_same_v<A, float>) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(a + i);
      out[i] = f.x, out[i + 1] = f.y, out[i + 2] = f.z, out[i + 3] = f.w;
    }
  } else {
    unpack(*reinterpret_cast<const uint4*>(a), out);
  }
}

// The weight rows of one phase, held in registers: ITEMS items of ROWS rows, each row CH chunks
// of VEC elements. Item i belongs to warp i mod TW. They are loaded a phase before they are
// used, so that their latency hides behind the work and the barrier in between.
template <int ITEMS, int ROWS, int CH>
struct Tiles {
  static constexpr int PER_WARP = (ITEMS + TW - 1) / TW, PER_LANE = (CH + 31) / 32;
  uint4 w[PER_WARP][ROWS][PER_LANE];
  int c0[PER_WARP][ROWS];   // first chunk of the row, where a row is split between warps

  // row_ptr(item, r, c0) -> the row's chunk c0 (nullptr: no row, zeros).
  template <typename RowPtr>
  __device__ __forceinline__ void load(RowPtr row_ptr) {
    const int lane = threadIdx.x % 32, warp = blockIdx.x * WARPS + threadIdx.x / 32;
#pragma unroll
    for (int it = 0; it < PER_WARP; ++it) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        c0[it][r] = 0;
        const int item = warp + it * TW;
        const uint4* row = item < ITEMS ? row_ptr(item, r, c0[it][r]) : nullptr;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
          const int c = lane + 32 * j;
          w[it][r][j] = row != nullptr && c < CH ? __ldg(row + c) : make_uint4(0, 0, 0, 0);
        }
      }
    }
  }

  // The products with the B activation rows in shared memory (row stride STRIDE);
  // finish(item, sums[ROWS][B]) gets the sums in every lane.
  template <int STRIDE, typename A, typename Finish>
  __device__ __forceinline__ void multiply(const A* act, Finish finish) const {
    const int lane = threadIdx.x % 32, warp = blockIdx.x * WARPS + threadIdx.x / 32;
#pragma unroll
    for (int it = 0; it < PER_WARP; ++it) {
      const int item = warp + it * TW;
      if (item >= ITEMS) break;   // warp-uniform
      float sums[ROWS][B];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int b = 0; b < B; ++b) sums[r][b] = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
          const int c = lane + 32 * j;
          if (c < CH) {
            float wf[VEC];
            unpack(w[it][r][j], wf);
#pragma unroll
            for (int b = 0; b < B; ++b) {
              float af[VEC];
              load_act(act + b * STRIDE + (c0[it][r] + c) * VEC, af);
#pragma unroll
              for (int e = 0; e < VEC; ++e) sums[r][b] = fmaf(wf[e], af[e], sums[r][b]);
            }
          }
        }
#pragma unroll
        for (int b = 0; b < B; ++b) sums[r][b] = warp_sum(sums[r][b]);
      }
      finish(item, sums);
    }
  }
};

// The tokens fed at the current step (fed_token), each block's copy.
__shared__ int step_tokens[B];

// Shared act[b][i] = RMSNorm(x[b]) * w, rounded to T as the projections see it.
__device__ void load_normed(const Params& p, bool first_layer, const float* norm_w, float* sm) {
  float* act = sm + SM_ACT;
  float* inv_rms = sm + SM_NORM;
  const float* x = p.ws + WS_X;
  for (int e = threadIdx.x; e < B * D; e += THREADS) act[e] = first_layer ? embedded(p, step_tokens[e / D], e % D) : x[e];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int b = threadIdx.x / 32; b < B; b += WARPS) {
    float s = 0.f;
    for (int i = lane; i < D; i += 32) s += act[b * D + i] * act[b * D + i];
    s = warp_sum(s);
    if (lane == 0) inv_rms[b] = rsqrtf(s / D + p.eps);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < B * D; e += THREADS) act[e] = round_t(act[e] * inv_rms[e / D] * norm_w[e % D]);
  __syncthreads();
}

// ------------------------------------------------------------------------------- phases

using QkvTiles = Tiles<3 * D / 2, 2, D / VEC>;   // an item is a RoPE pair: two rows
using OTiles = Tiles<D, 1, D / VEC>;
using GateUpTiles = Tiles<F, 2, D / VEC>;        // an item is a hidden unit: its gate and up rows
constexpr int DOWN_ITEMS = D * DOWN_PARTS, DOWN_CH = F / VEC / DOWN_PARTS;
using DownTiles = Tiles<(DOWN_ITEMS + TW - 1) / TW * TW, 1, DOWN_CH>;   // every warp the same count
using HeadTiles = Tiles<V, 1, D / VEC>;

__device__ __forceinline__ void load_qkv(QkvTiles& t, const Params& p, int l) {
  const T* w = p.wqkv + (size_t)l * 3 * D * D;
  t.load([&](int pair, int r, int&) { const Pair q(pair); return row_of(w, q.which * D + (r ? q.d2 : q.d1), D); });
}
__device__ __forceinline__ void load_o(OTiles& t, const Params& p, int l) {
  const T* w = p.wo + (size_t)l * D * D;
  t.load([&](int j, int, int&) { return row_of(w, j, D); });
}
__device__ __forceinline__ void load_gate_up(GateUpTiles& t, const Params& p, int l) {
  const T* w = p.wgu + (size_t)l * 2 * F * D;
  t.load([&](int u, int r, int&) { return row_of(w, r * F + u, D); });
}
__device__ __forceinline__ void load_down(DownTiles& t, const Params& p, int l) {
  const T* w = p.wdown + (size_t)l * D * F;
  t.load([&](int item, int, int& c0) -> const uint4* {
    c0 = (item % DOWN_PARTS) * DOWN_CH;
    return item < DOWN_ITEMS ? row_of(w, item / DOWN_PARTS, F) + c0 : nullptr;
  });
}
__device__ __forceinline__ void load_head(HeadTiles& t, const Params& p) {
  t.load([&](int v, int, int&) { return row_of(p.embed, v, D); });
}

// 1. Q/K/V of the normed input, RoPE on Q and K; Q to the workspace, K and V into the cache.
__device__ void qkv_phase(const Params& p, int l, int time, float* sm, const QkvTiles& tiles) {
  load_normed(p, l == 0, p.attn_norm + l * D, sm);
  tiles.multiply<D>(sm + SM_ACT, [&](int pair, float (&s)[2][B]) {
    const int b = threadIdx.x % 32;   // lane b stores row b
    if (b >= B) return;
    const Pair q(pair);
    float a = round_t(s[0][b]), c = round_t(s[1][b]);
    if (q.which < 2) rotate(p, b, time, q.i, a, c);
    if (q.which == 0) {
      p.ws[WS_Q + b * D + q.d1] = a;
      p.ws[WS_Q + b * D + q.d2] = c;
    } else {
      T* slot = cache_slot(p, l, q.which, b, q.h, time);
      slot[q.d1 - q.h * K] = from_f<T>(a);
      slot[q.d2 - q.h * K] = from_f<T>(c);
    }
  });
}

// 2. Attention of each (row, head) over the slots written so far, in NS splits of the slots;
// each split leaves its running max, sum of exponentials and weighted sum of values.
__device__ void attention_phase(const Params& p, int l, int time, float* sm) {
  const int S = p.cache_size[l], window = p.window[l], n = min(time + 1, S);
  const T* kc = p.k_cache[l];
  const T* vc = p.v_cache[l];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* warp_part = sm + SM_WARP;
  for (int task = blockIdx.x; task < TASKS; task += NB) {   // block-uniform
    const int b = task / (H * NS), h = (task / NS) % H, split = task % NS;
    const int lo = split * n / NS, hi = (split + 1) * n / NS, start = p.starts[b];
    float q[KL], acc[KL];
#pragma unroll
    for (int j = 0; j < KL; ++j) {
      const int d = lane + 32 * j;
      q[j] = d < K ? p.ws[WS_Q + b * D + h * K + d] : 0.f;
      acc[j] = 0.f;
    }
    float run_max = -1e30f, total = 0.f;
    const size_t head = ((size_t)b * H + h) * S;
    for (int slot = lo + warp; slot < hi; slot += WARPS) {
      const bool visible = key_visible(time, slot, S, start, window);
      float k[KL], v[KL], score = 0.f;
#pragma unroll
      for (int j = 0; j < KL; ++j) {
        const int d = lane + 32 * j;
        k[j] = d < K ? to_f(kc[(head + slot) * K + d]) : 0.f;
        v[j] = d < K ? to_f(vc[(head + slot) * K + d]) : 0.f;
        score += q[j] * k[j];
      }
      score = warp_sum(score) * p.attn_scale;
      if (visible) {
        const float new_max = fmaxf(run_max, score), rescale = expf(run_max - new_max), prob = expf(score - new_max);
        total = total * rescale + prob;
#pragma unroll
        for (int j = 0; j < KL; ++j) acc[j] = acc[j] * rescale + prob * v[j];
        run_max = new_max;
      }
    }
    float* mine = warp_part + warp * PART;
    if (lane == 0) mine[0] = run_max, mine[1] = total;
#pragma unroll
    for (int j = 0; j < KL; ++j)
      if (lane + 32 * j < K) mine[2 + lane + 32 * j] = acc[j];
    __syncthreads();
    for (int d = threadIdx.x; d < PART; d += THREADS) {   // merge the warps, write the split
      float m = -1e30f;
      for (int w = 0; w < WARPS; ++w) m = fmaxf(m, warp_part[w * PART]);
      float sum = 0.f;
      for (int w = 0; w < WARPS; ++w) sum += expf(warp_part[w * PART] - m) * warp_part[w * PART + (d == 0 ? 1 : d)];
      p.ws[WS_PART + task * PART + d] = d == 0 ? m : sum;
    }
    __syncthreads();
  }
}

// 3. Every block combines all splits into the attention output (in shared memory), then
// computes its O rows and adds them to the residual stream.
__device__ void o_phase(const Params& p, int l, float* sm, const OTiles& tiles) {
  float* act = sm + SM_ACT;
  float* split_w = sm + SM_SPLIT;
  const float* part = p.ws + WS_PART;
  constexpr int PER_THREAD = (B * D + THREADS - 1) / THREADS;
  float vals[PER_THREAD][NS];   // issued first, so that their latency overlaps the weights'
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) {
    const int idx = threadIdx.x + e * THREADS, g = ((idx / D) * H + (idx % D) / K) * NS;
#pragma unroll
    for (int s = 0; s < NS; ++s) vals[e][s] = idx < B * D ? part[(g + s) * PART + 2 + idx % K] : 0.f;
  }
  for (int g = threadIdx.x; g < B * H; g += THREADS) {   // split weights exp(m_s - M) / total
    float m = -1e30f, total = 0.f;
    for (int s = 0; s < NS; ++s) m = fmaxf(m, part[(g * NS + s) * PART]);
    for (int s = 0; s < NS; ++s) total += expf(part[(g * NS + s) * PART] - m) * part[(g * NS + s) * PART + 1];
    for (int s = 0; s < NS; ++s) split_w[g * NS + s] = total > 0.f ? expf(part[(g * NS + s) * PART] - m) / total : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) {
    const int idx = threadIdx.x + e * THREADS, g = ((idx / D) * H + (idx % D) / K) * NS;
    float out = 0.f;
#pragma unroll
    for (int s = 0; s < NS; ++s) out += idx < B * D ? split_w[g + s] * vals[e][s] : 0.f;
    if (idx < B * D) act[idx] = round_t(out);
  }
  __syncthreads();
  tiles.multiply<D>(act, [&](int j, float (&s)[1][B]) {
    const int b = threadIdx.x % 32;
    if (b >= B) return;
    float* x = p.ws + WS_X + b * D + j;
    *x = (l == 0 ? embedded(p, step_tokens[b], j) : *x) + round_t(s[0][b]);
  });
}

// 4. RMSNorm, then per hidden unit its gate and up rows; SiLU(gate) * up to the workspace.
__device__ void gate_up_phase(const Params& p, int l, float* sm, const GateUpTiles& tiles) {
  load_normed(p, false, p.mlp_norm + l * D, sm);
  T* hid = reinterpret_cast<T*>(p.ws + WS_HID);
  tiles.multiply<D>(sm + SM_ACT, [&](int u, float (&s)[2][B]) {
    const int b = threadIdx.x % 32;
    if (b >= B) return;
    hid[b * F + u] = swiglu(s[0][b], s[1][b]);
  });
}

// 5. Down projection: DOWN_PARTS warps of a block share a row (F inputs); their sums are added
// in a fixed order (deterministic), then to the residual stream.
__device__ void down_phase(const Params& p, float* sm, const DownTiles& tiles) {
  T* act = reinterpret_cast<T*>(sm + SM_ACT);
  const uint4* hid = reinterpret_cast<const uint4*>(p.ws + WS_HID);
  for (int c = threadIdx.x; c < B * F / VEC; c += THREADS) reinterpret_cast<uint4*>(act)[c] = hid[c];
  __syncthreads();
  float* parts = sm + SM_DOWN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Every warp of the block calls this equally often (DownTiles pads the items), so the
  // barriers inside match.
  tiles.multiply<F>(act, [&](int item, float (&s)[1][B]) {
    if (lane < B) parts[warp * B + lane] = s[0][lane];
    __syncthreads();
    if (item < DOWN_ITEMS && warp % DOWN_PARTS == 0 && lane < B) {
      float sum = 0.f;
      for (int q = 0; q < DOWN_PARTS; ++q) sum += parts[(warp + q) * B + lane];
      p.ws[WS_X + lane * D + item / DOWN_PARTS] += round_t(sum);
    }
    __syncthreads();
  });
}

// 6. Final RMSNorm and the tied head: float32 logits, or (greedy) each row's arg-max candidate.
__device__ void head_phase(const Params& p, float* sm, const HeadTiles& tiles) {
  load_normed(p, false, p.final_norm, sm);
  tiles.multiply<D>(sm + SM_ACT, [&](int v, float (&s)[1][B]) {
    const int b = threadIdx.x % 32;
    if (b >= B) return;
    if (p.logits) {
      p.logits[(size_t)b * V + v] = capped(p, s[0][b]);
    } else {
      offer_best(b, argmax_key(capped(p, s[0][b]), v));
    }
  });
}

// ------------------------------------------------------------------------------- the step

// Each phase's weights are loaded one phase ahead of their use (see Tiles).
__global__ void __launch_bounds__(THREADS, 1) decode_step_kernel(const Params p) {
  extern __shared__ __align__(16) float sm[];
  unsigned long long barrier = barrier_start();
  begin_steps(p);
  QkvTiles qkv;
  OTiles o;
  GateUpTiles gate_up;
  DownTiles down;
  HeadTiles head;
  for (int step = 0; step < p.steps; ++step) {
    const int time = *p.time + step;
    for (int b = threadIdx.x; b < B; b += THREADS) {   // after the grid barrier that ends a greedy step
      step_tokens[b] = fed_token(p, b, step);
      if (blockIdx.x == 0 && !p.logits) record_tokens(p, b, step);
    }
    __syncthreads();
    load_qkv(qkv, p, 0);
    for (int l = 0; l < L; ++l) {
      load_o(o, p, l);
      qkv_phase(p, l, time, sm, qkv);
      grid_barrier(barrier);
      load_gate_up(gate_up, p, l);
      attention_phase(p, l, time, sm);
      grid_barrier(barrier);
      load_down(down, p, l);
      o_phase(p, l, sm, o);
      grid_barrier(barrier);
      if (l + 1 < L) {
        load_qkv(qkv, p, l + 1);
      } else {
        load_head(head, p);
      }
      gate_up_phase(p, l, sm, gate_up);
      grid_barrier(barrier);
      down_phase(p, sm, down);
      grid_barrier(barrier);
    }
    head_phase(p, sm, head);
    if (!p.logits) {
      publish_best(p, step, 0, B);
      grid_barrier(barrier);
    }
  }
  if (!p.logits && blockIdx.x == 0)
    for (int b = threadIdx.x; b < B; b += THREADS) record_last_token(p, b);
}

#include "decode_ffi.cuh"
