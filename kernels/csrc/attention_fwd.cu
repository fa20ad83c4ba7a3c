// Fused attention forward (online softmax; the [T, T] score matrix never exists in memory).
//
// Shape legend: B batch, H query heads, KH key/value heads (KH divides H), T sequence, D head dim.
// Layout: q/o [B, H, T, D], k/v [B, KH, T, D], all contiguous; lse [B, H, T] fp32 (base-2).
//
// A SIMT kernel (fp32 FMAs, no tensor cores): each warp owns ROWS query rows, the block shares each
// K/V tile through shared memory, and lanes split the tile's keys for scores and the head dim for
// the output. It is the worked example of keel's extern "C" + binding path and an independent
// cross-check of the Triton kernel, not a FlashAttention-2 competitor.
#include <cstdint>
#include <math_constants.h>
#include "common.cuh"

namespace keel {

constexpr int kWarps = 4;
constexpr int kRows = 8;                    // query rows per warp
constexpr int kBlockM = kWarps * kRows;     // query rows per block
constexpr int kBlockN = 64;                 // keys per shared-memory tile
constexpr int kKeysPerLane = kBlockN / 32;

template <int D>
constexpr size_t attn_smem_bytes() {
  // K rows padded by one float so lanes reading different keys at the same column hit distinct banks.
  return sizeof(float) * (kBlockM * D + kBlockN * (D + 1) + kBlockN * D);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kWarps * 32)
attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, scalar_t* __restrict__ o, float* __restrict__ lse,
                     const int* __restrict__ doc_ids, int H, int KH, int T, float scale_log2, int causal) {
  static_assert(D % 32 == 0, "each lane owns D / 32 output columns");
  constexpr int kDimsPerLane = D / 32;
  extern __shared__ float smem[];
  float* q_s = smem;                          // [kBlockM][D], pre-scaled by scale * log2(e)
  float* k_s = q_s + kBlockM * D;             // [kBlockN][D + 1]
  float* v_s = k_s + kBlockN * (D + 1);       // [kBlockN][D]

  const int bh = blockIdx.y, b = bh / H, h = bh % H, kh = h / (H / KH);
  const int m0 = blockIdx.x * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* q_bh = q + static_cast<int64_t>(bh) * T * D;
  const scalar_t* k_bh = k + (static_cast<int64_t>(b) * KH + kh) * T * D;
  const scalar_t* v_bh = v + (static_cast<int64_t>(b) * KH + kh) * T * D;
  const int* doc_b = doc_ids ? doc_ids + static_cast<int64_t>(b) * T : nullptr;

  for (int i = threadIdx.x; i < kBlockM * D; i += blockDim.x) {
    const int row = m0 + i / D;
    q_s[i] = row < T ? to_float(q_bh[static_cast<int64_t>(row) * D + i % D]) * scale_log2 : 0.f;
  }

  float acc[kRows][kDimsPerLane];
  float m_i[kRows], l_i[kRows];
  int doc_q[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + warp * kRows + r;
    m_i[r] = -CUDART_INF_F;
    l_i[r] = 0.f;
    doc_q[r] = (doc_b && row < T) ? doc_b[row] : 0;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] = 0.f;
  }

  // Causal: keys past the block's last query row are never visible.
  const int kv_end = causal ? min(T, m0 + kBlockM) : T;
  for (int n0 = 0; n0 < kv_end; n0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous tile (and q_s is written on the first pass)
    for (int i = threadIdx.x; i < kBlockN * D; i += blockDim.x) {
      const int key = n0 + i / D, col = i % D;
      const bool in = key < T;
      k_s[(i / D) * (D + 1) + col] = in ? to_float(k_bh[static_cast<int64_t>(key) * D + col]) : 0.f;
      v_s[i] = in ? to_float(v_bh[static_cast<int64_t>(key) * D + col]) : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = m0 + warp * kRows + r;
      const float* q_row = q_s + (warp * kRows + r) * D;
      float s[kKeysPerLane];
      float tile_max = -CUDART_INF_F;
#pragma unroll
      for (int j = 0; j < kKeysPerLane; ++j) {
        const int kk = lane + 32 * j, key = n0 + kk;
        const float* k_row = k_s + kk * (D + 1);
        float dot = 0.f;
#pragma unroll 8
        for (int c = 0; c < D; ++c) dot = fmaf(q_row[c], k_row[c], dot);
        bool visible = key < T && row < T && (!causal || key <= row);
        if (doc_b) visible = visible && key < T && doc_b[min(key, T - 1)] == doc_q[r];
        s[j] = visible ? dot : -CUDART_INF_F;
        tile_max = fmaxf(tile_max, s[j]);
      }
      tile_max = warp_max(tile_max);
      const float m_new = fmaxf(m_i[r], tile_max);
      // A row may see no key in this tile (other document, padding): avoid inf - inf.
      const float m_safe = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float alpha = exp2f(m_i[r] - m_safe);
      float p_sum = 0.f;
#pragma unroll
      for (int j = 0; j < kKeysPerLane; ++j) {
        s[j] = exp2f(s[j] - m_safe);
        p_sum += s[j];
      }
      l_i[r] = l_i[r] * alpha + warp_sum(p_sum);
      m_i[r] = m_new;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int j = 0; j < kKeysPerLane; ++j) {
#pragma unroll 8
        for (int src = 0; src < 32; ++src) {
          const float p = __shfl_sync(kFullMask, s[j], src);
          const float* v_row = v_s + (32 * j + src) * D;
#pragma unroll
          for (int e = 0; e < kDimsPerLane; ++e) acc[r][e] = fmaf(p, v_row[lane + 32 * e], acc[r][e]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + warp * kRows + r;
    if (row >= T) continue;
    const float l_safe = l_i[r] > 0.f ? l_i[r] : 1.f;
    scalar_t* o_row = o + (static_cast<int64_t>(bh) * T + row) * D;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) o_row[lane + 32 * e] = from_float<scalar_t>(acc[r][e] / l_safe);
    if (lane == 0) lse[static_cast<int64_t>(bh) * T + row] = m_i[r] + log2f(l_safe);
  }
}

template <typename scalar_t, int D>
cudaError_t launch_attention_fwd(const void* q, const void* k, const void* v, void* o, float* lse,
                                 const int* doc_ids, int B, int H, int KH, int T, float scale,
                                 int causal, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<scalar_t, D>;
  constexpr size_t smem = attn_smem_bytes<D>();
  // Above 48 KB of dynamic shared memory a kernel must opt in explicitly.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((T + kBlockM - 1) / kBlockM, B * H);
  const float log2e = 1.4426950408889634f;
  kernel<<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
      static_cast<scalar_t*>(o), lse, doc_ids, H, KH, T, scale * log2e, causal);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t dispatch_head_dim(int D, const void* q, const void* k, const void* v, void* o, float* lse,
                              const int* doc_ids, int B, int H, int KH, int T, float scale, int causal,
                              cudaStream_t stream) {
  switch (D) {
    case 32: return launch_attention_fwd<scalar_t, 32>(q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, stream);
    case 64: return launch_attention_fwd<scalar_t, 64>(q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, stream);
    case 128: return launch_attention_fwd<scalar_t, 128>(q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace keel

// Returns a cudaError_t code (0 = success). cudaErrorInvalidValue for an unsupported dtype/head dim.
extern "C" int keel_attention_fwd(const void* q, const void* k, const void* v, void* o, float* lse,
                                  const int* doc_ids, int B, int H, int KH, int T, int D, int dtype,
                                  int causal, float scale, void* stream) {
  if (B <= 0 || H <= 0 || KH <= 0 || H % KH != 0 || T <= 0) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case keel::kFloat32: return keel::dispatch_head_dim<float>(D, q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, s);
    case keel::kFloat16: return keel::dispatch_head_dim<__half>(D, q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, s);
    case keel::kBFloat16: return keel::dispatch_head_dim<__nv_bfloat16>(D, q, k, v, o, lse, doc_ids, B, H, KH, T, scale, causal, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" const char* keel_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
