// Fused RMSNorm forward and backward: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
//
// Shape legend: R rows (all leading dims flattened), D hidden size, P partial-sum blocks for dw.
// Layout: x/y/dy/dx [R, D] contiguous, w/dw [D], rstd [R] fp32 (saved by forward for backward).
// Statistics and accumulation are fp32 whatever the storage dtype.
#include <cstdint>
#include "common.cuh"

namespace keel {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
rmsnorm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, scalar_t* __restrict__ y,
                   float* __restrict__ rstd, int D, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const scalar_t* x_row = x + row * D;
  float ss = 0.f;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float xv = to_float(x_row[c]);
    ss = fmaf(xv, xv, ss);
  }
  const float r = rsqrtf(block_sum(ss, scratch) / D + eps);
  scalar_t* y_row = y + row * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x)
    y_row[c] = from_float<scalar_t>(to_float(x_row[c]) * r * to_float(w[c]));
  if (threadIdx.x == 0) rstd[row] = r;
}

// dx_i = r * (w_i dy_i - x_i r^2 / D * sum_j w_j dy_j x_j);  dw_j = sum_rows dy_j x_j r.
// Each block handles rows blockIdx.x, blockIdx.x + P, ... and keeps its dw partial in shared memory
// (column c belongs to thread c % blockDim, so no two threads touch one entry): no atomics, so dw is
// bitwise reproducible; rmsnorm_dw_reduce_kernel sums the P partials.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
rmsnorm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                   const float* __restrict__ rstd, scalar_t* __restrict__ dx, float* __restrict__ dw_partial,
                   int64_t R, int D) {
  extern __shared__ float dw_s[];  // [D]
  __shared__ float scratch[32];
  for (int c = threadIdx.x; c < D; c += blockDim.x) dw_s[c] = 0.f;
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const scalar_t* x_row = x + row * D;
    const scalar_t* dy_row = dy + row * D;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float xv = to_float(x_row[c]), dyv = to_float(dy_row[c]);
      dot = fmaf(dyv * to_float(w[c]), xv, dot);
      dw_s[c] += dyv * xv * r;
    }
    const float coef = block_sum(dot, scratch) * r * r / D;
    scalar_t* dx_row = dx + row * D;
    for (int c = threadIdx.x; c < D; c += blockDim.x)
      dx_row[c] = from_float<scalar_t>(r * (to_float(w[c]) * to_float(dy_row[c]) - to_float(x_row[c]) * coef));
  }
  for (int c = threadIdx.x; c < D; c += blockDim.x) dw_partial[static_cast<int64_t>(blockIdx.x) * D + c] = dw_s[c];
}

template <typename scalar_t>
__global__ void rmsnorm_dw_reduce_kernel(const float* __restrict__ dw_partial, scalar_t* __restrict__ dw, int P, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  float sum = 0.f;
  for (int p = 0; p < P; ++p) sum += dw_partial[static_cast<int64_t>(p) * D + c];
  dw[c] = from_float<scalar_t>(sum);
}

template <typename scalar_t>
cudaError_t launch_fwd(const void* x, const void* w, void* y, float* rstd, int64_t R, int D, float eps, cudaStream_t s) {
  rmsnorm_fwd_kernel<scalar_t><<<static_cast<unsigned>(R), kThreads, 0, s>>>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(w), static_cast<scalar_t*>(y), rstd, D, eps);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                       float* dw_partial, int64_t R, int D, int P, cudaStream_t s) {
  const size_t smem = sizeof(float) * D;
  auto kernel = rmsnorm_bwd_kernel<scalar_t>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<P, kThreads, smem, s>>>(static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                                   static_cast<const scalar_t*>(w), rstd, static_cast<scalar_t*>(dx), dw_partial, R, D);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  rmsnorm_dw_reduce_kernel<scalar_t><<<(D + 255) / 256, 256, 0, s>>>(dw_partial, static_cast<scalar_t*>(dw), P, D);
  return cudaGetLastError();
}

}  // namespace keel

// Both return a cudaError_t code (0 = success); cudaErrorInvalidValue for bad sizes or dtype.
extern "C" int keel_rmsnorm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t R, int D, float eps,
                                int dtype, void* stream) {
  if (R <= 0 || R > 0x7fffffff || D <= 0) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case keel::kFloat32: return keel::launch_fwd<float>(x, w, y, rstd, R, D, eps, s);
    case keel::kFloat16: return keel::launch_fwd<__half>(x, w, y, rstd, R, D, eps, s);
    case keel::kBFloat16: return keel::launch_fwd<__nv_bfloat16>(x, w, y, rstd, R, D, eps, s);
    default: return cudaErrorInvalidValue;
  }
}

// dw_partial: P * D fp32 workspace supplied by the caller (P blocks, e.g. a few per SM).
extern "C" int keel_rmsnorm_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                                float* dw_partial, int64_t R, int D, int P, int dtype, void* stream) {
  // dw partials live in shared memory: D floats must fit Hopper's 227 KB.
  if (R <= 0 || D <= 0 || P <= 0 || static_cast<size_t>(D) * sizeof(float) > 227 * 1024) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case keel::kFloat32: return keel::launch_bwd<float>(dy, x, w, rstd, dx, dw, dw_partial, R, D, P, s);
    case keel::kFloat16: return keel::launch_bwd<__half>(dy, x, w, rstd, dx, dw, dw_partial, R, D, P, s);
    case keel::kBFloat16: return keel::launch_bwd<__nv_bfloat16>(dy, x, w, rstd, dx, dw, dw_partial, R, D, P, s);
    default: return cudaErrorInvalidValue;
  }
}
