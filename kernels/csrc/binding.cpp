// Thin torch binding over the extern "C" launchers in attention_fwd.cu and rmsnorm.cu.
//
// Shape legend: B batch, H query heads, KH key/value heads, T sequence, D head dim / hidden size,
// R rows. It includes no CUDA header and links no torch CUDA library, so it builds against a CPU
// torch (see PLATFORM.md); the caller passes the CUDA stream as an integer handle.
#include <torch/extension.h>

#include <string>

extern "C" {
int keel_attention_fwd(const void* q, const void* k, const void* v, void* o, float* lse, const int* doc_ids,
                       int B, int H, int KH, int T, int D, int dtype, int causal, float scale, void* stream);
int keel_rmsnorm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t R, int D, float eps, int dtype,
                     void* stream);
int keel_rmsnorm_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                     float* dw_partial, int64_t R, int D, int P, int dtype, void* stream);
const char* keel_cuda_error_string(int code);
}

namespace {

void check_cuda(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "keel CUDA op '", op, "': tensor '", name, "' is on ", t.device(),
              ", but these kernels run only on CUDA tensors. Move it to a GPU, or on CPU use the "
              "reference implementation (attention impl 'sdpa', torch RMSNorm).");
}

int dtype_code(const torch::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kFloat16: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "keel CUDA op '", op, "': dtype ", t.scalar_type(),
                         " is not supported; use float32, float16 or bfloat16");
  }
  return -1;
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, "keel CUDA op '", op, "' failed to launch: ", keel_cuda_error_string(code));
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

std::vector<torch::Tensor> attention_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         c10::optional<torch::Tensor> doc_ids, bool causal, double scale,
                                         int64_t stream) {
  const char* op = "attention_fwd";
  check_cuda(q, op, "q");
  check_cuda(k, op, "k");
  check_cuda(v, op, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": expected q [B,H,T,D], k/v [B,KH,T,D]");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              op, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, op, ": query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op, ": q, k, v dtypes differ");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op, ": q, k, v are on different devices");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KH = k.size(1);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": head dim ", D, " is not compiled; use 32, 64 or 128");
  const int* doc_ptr = nullptr;
  torch::Tensor doc;
  if (doc_ids.has_value()) {
    check_cuda(*doc_ids, op, "doc_ids");
    TORCH_CHECK(doc_ids->dim() == 2 && doc_ids->size(0) == B && doc_ids->size(1) == T, op, ": doc_ids must be [B, T]");
    doc = doc_ids->to(torch::kInt32).contiguous();
    doc_ptr = doc.data_ptr<int>();
  }
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B, H, T}, q.options().dtype(torch::kFloat32));
  check_launch(keel_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                                  doc_ptr, B, H, KH, T, D, dtype_code(q, op), causal ? 1 : 0,
                                  static_cast<float>(scale), as_stream(stream)), op);
  return {o, lse};
}

std::vector<torch::Tensor> rmsnorm_fwd(torch::Tensor x, torch::Tensor w, double eps, int64_t stream) {
  const char* op = "rmsnorm_fwd";
  check_cuda(x, op, "x");
  check_cuda(w, op, "weight");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), op, ": weight must be [D] with D = x.size(-1)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and weight dtypes differ");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({R}, x.options().dtype(torch::kFloat32));
  check_launch(keel_rmsnorm_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), R, D,
                                static_cast<float>(eps), dtype_code(x, op), as_stream(stream)), op);
  return {y, rstd};
}

std::vector<torch::Tensor> rmsnorm_bwd(torch::Tensor dy, torch::Tensor x, torch::Tensor w, torch::Tensor rstd,
                                       int64_t num_partials, int64_t stream) {
  const char* op = "rmsnorm_bwd";
  check_cuda(dy, op, "grad_out");
  check_cuda(x, op, "x");
  check_cuda(w, op, "weight");
  check_cuda(rstd, op, "rstd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": grad_out must match x");
  dy = dy.contiguous();
  x = x.contiguous();
  w = w.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(num_partials, R));
  auto dx = torch::empty_like(x);
  auto dw = torch::empty_like(w);
  auto dw_partial = torch::empty({P, D}, x.options().dtype(torch::kFloat32));
  check_launch(keel_rmsnorm_bwd(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                dw.data_ptr(), dw_partial.data_ptr<float>(), R, D, P, dtype_code(x, op),
                                as_stream(stream)), op);
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "keel CUDA kernels: fused attention forward, RMSNorm forward/backward";
  m.def("attention_fwd", &attention_fwd, "fused attention forward -> (o, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("doc_ids"), py::arg("causal"), py::arg("scale"), py::arg("stream"));
  m.def("rmsnorm_fwd", &rmsnorm_fwd, "RMSNorm forward -> (y, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("stream"));
  m.def("rmsnorm_bwd", &rmsnorm_bwd, "RMSNorm backward -> (dx, dweight)", py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("rstd"), py::arg("num_partials"), py::arg("stream"));
}
