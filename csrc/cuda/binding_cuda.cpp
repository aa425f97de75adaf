// capsparse._C_cuda: thin torch binding for the CUDA kernels in csrc/cuda/*.cu.
//
// Built only with a CUDA build of torch (setup.py: CUDAExtension "capsparse._C_cuda").  Every
// function checks devices, dtypes, shapes and contiguity, allocates outputs / workspaces with the
// caching allocator, and launches on at::cuda::getCurrentCUDAStream().  No host syncs: nnz stays
// a device tensor.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>
#include <tuple>

extern "C" {
cudaError_t capsparse_bsl_forward(int dtype, const void* x, long long ldx, const void* w, long long ldw,
                                  const void* bias, void* y, long long ldy, const int* row_ptr, const int* row_cols,
                                  int T, int N, int K, int bm, int bk, cudaStream_t stream);
cudaError_t capsparse_bsl_grad_input(int dtype, const void* grad_y, long long ldgy, const void* w, long long ldw,
                                     void* grad_x, long long ldgx, const int* col_ptr, const int* col_rows, int T,
                                     int N, int K, int bm, int bk, cudaStream_t stream);
size_t capsparse_bsl_grad_weight_workspace_bytes(int T, int N, int K, int bm, int bk);
cudaError_t capsparse_bsl_grad_weight(int dtype, const void* grad_y, long long ldgy, const void* x, long long ldx,
                                      void* grad_w, long long ldgw, const int* block_rows, const int* block_cols,
                                      const long long* nnz, int T, int N, int K, int bm, int bk, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);
cudaError_t capsparse_build_block_metadata(const unsigned char* bitmap, long long ld, int R, int C, int* row_ptr,
                                           int* row_cols, int* col_ptr, int* col_rows, int* block_rows,
                                           long long* nnz, cudaStream_t stream);
size_t capsparse_cap_contrastive_workspace_bytes(int B, int K_total, int D, int has_labels);
cudaError_t capsparse_cap_contrastive(int q_dtype, const void* q, long long ldq, int B, int D, int k_dtype,
                                      const void* bank, long long ldb, const long long* key_index, int K,
                                      const void* extra, long long lde, int E, const long long* query_ids,
                                      const long long* key_ids, const long long* query_labels,
                                      const long long* key_labels, const long long* exclude_index, float temperature,
                                      int normalization, float* loss_u, float* loss_s, void* grad_u, void* grad_s,
                                      long long ldg, void* workspace, size_t workspace_bytes, cudaStream_t stream);
}

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
}

void check_2d(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got ", t.dim(), " dims");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, ": expected unit stride in the last dim");
}

void check_index(const at::Tensor& t, const char* name, int64_t numel, at::ScalarType st = at::kInt) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == st, name, ": expected ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(t.numel() >= numel, name, ": expected at least ", numel, " entries, got ", t.numel());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), name, ": expected device ", a.device(), ", got ", b.device());
}

int to_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, name, " = ", v, " does not fit the kernels' int32 sizes");
  return static_cast<int>(v);
}

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "capsparse._C_cuda.", what, ": ", cudaGetErrorString(err));
}

const long long* i64(const at::Tensor& t) { return reinterpret_cast<const long long*>(t.data_ptr<int64_t>()); }

void check_blocks(int64_t n, int64_t k, int64_t bm, int64_t bk) {
  TORCH_CHECK(bm == bk && (bm == 32 || bm == 64), "block size: the CUDA kernels support 32x32 and 64x64, got ", bm,
              "x", bk);
  TORCH_CHECK(n % bm == 0 && k % bk == 0, "weight ", n, "x", k, " is not divisible into ", bm, "x", bk, " blocks");
}

at::Tensor bsl_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& row_ptr, const at::Tensor& row_cols, int64_t bm, int64_t bk) {
  check_2d(x, "x");
  check_2d(weight, "weight");
  check_same_device(x, weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have the same dtype");
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x is [", T, ", ", K, "] but weight is [", N, ", ", weight.size(1), "]");
  check_blocks(N, K, bm, bk);
  const int64_t R = N / bm, C = K / bk;
  check_index(row_ptr, "row_ptr", R + 1);
  check_index(row_cols, "row_cols", R * C);
  check_same_device(x, row_ptr, "row_ptr");
  check_same_device(x, row_cols, "row_cols");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_cuda(b, "bias");
    check_same_device(x, b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.is_contiguous(), "bias: expected a contiguous [", N, "] tensor");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "bias must have the dtype of x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  if (K == 0) {
    if (b.defined()) y.copy_(b.unsqueeze(0).expand({T, N}));
    else y.zero_();
    return y;
  }
  check_cuda_error(capsparse_bsl_forward(dtype_code(x, "x"), x.data_ptr(), x.stride(0), weight.data_ptr(),
                                         weight.stride(0), b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                                         y.stride(0), row_ptr.data_ptr<int>(), row_cols.data_ptr<int>(),
                                         to_int(T, "T"), to_int(N, "N"), to_int(K, "K"), int(bm), int(bk),
                                         at::cuda::getCurrentCUDAStream()),
                   "bsl_forward");
  return y;
}

at::Tensor bsl_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& col_ptr,
                          const at::Tensor& col_rows, int64_t bm, int64_t bk) {
  check_2d(grad_y, "grad_y");
  check_2d(weight, "weight");
  check_same_device(grad_y, weight, "weight");
  TORCH_CHECK(grad_y.scalar_type() == weight.scalar_type(), "grad_y and weight must have the same dtype");
  const int64_t T = grad_y.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_y.size(1) == N, "grad_y is [", T, ", ", grad_y.size(1), "] but weight is [", N, ", ", K, "]");
  check_blocks(N, K, bm, bk);
  const int64_t R = N / bm, C = K / bk;
  check_index(col_ptr, "col_ptr", C + 1);
  check_index(col_rows, "col_rows", R * C);
  check_same_device(grad_y, col_ptr, "col_ptr");
  check_same_device(grad_y, col_rows, "col_rows");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  at::Tensor gx = at::empty({T, K}, grad_y.options());
  if (T == 0 || K == 0) return gx;
  check_cuda_error(capsparse_bsl_grad_input(dtype_code(grad_y, "grad_y"), grad_y.data_ptr(), grad_y.stride(0),
                                            weight.data_ptr(), weight.stride(0), gx.data_ptr(), gx.stride(0),
                                            col_ptr.data_ptr<int>(), col_rows.data_ptr<int>(), to_int(T, "T"),
                                            to_int(N, "N"), to_int(K, "K"), int(bm), int(bk),
                                            at::cuda::getCurrentCUDAStream()),
                   "bsl_grad_input");
  return gx;
}

at::Tensor bsl_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& block_rows,
                           const at::Tensor& block_cols, const at::Tensor& nnz, int64_t bm, int64_t bk) {
  check_2d(grad_y, "grad_y");
  check_2d(x, "x");
  check_same_device(grad_y, x, "x");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y and x must have the same dtype");
  const int64_t T = x.size(0), K = x.size(1), N = grad_y.size(1);
  TORCH_CHECK(grad_y.size(0) == T, "grad_y has ", grad_y.size(0), " rows but x has ", T);
  check_blocks(N, K, bm, bk);
  const int64_t cap = (N / bm) * (K / bk);
  check_index(block_rows, "block_rows", cap);
  check_index(block_cols, "block_cols", cap);
  check_index(nnz, "nnz", 1, at::kLong);
  check_same_device(x, block_rows, "block_rows");
  check_same_device(x, block_cols, "block_cols");
  check_same_device(x, nnz, "nnz");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gw = at::empty({N, K}, x.options());
  if (N == 0 || K == 0) return gw;
  const size_t ws_bytes = capsparse_bsl_grad_weight_workspace_bytes(to_int(T, "T"), int(N), int(K), int(bm), int(bk));
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_cuda_error(capsparse_bsl_grad_weight(dtype_code(x, "x"), grad_y.data_ptr(), grad_y.stride(0), x.data_ptr(),
                                             x.stride(0), gw.data_ptr(), gw.stride(0), block_rows.data_ptr<int>(),
                                             block_cols.data_ptr<int>(), i64(nnz),
                                             int(T), int(N), int(K), int(bm), int(bk),
                                             ws.defined() ? ws.data_ptr() : nullptr, ws_bytes,
                                             at::cuda::getCurrentCUDAStream()),
                   "bsl_grad_weight");
  return gw;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_block_metadata(
    const at::Tensor& bitmap) {
  check_cuda(bitmap, "bitmap");
  TORCH_CHECK(bitmap.dim() == 2, "bitmap: expected [R, C], got ", bitmap.dim(), " dims");
  TORCH_CHECK(bitmap.scalar_type() == at::kBool || bitmap.scalar_type() == at::kByte,
              "bitmap: expected bool or uint8, got ", bitmap.scalar_type());
  const c10::cuda::CUDAGuard guard(bitmap.device());
  const at::Tensor bm = bitmap.contiguous();
  const int64_t R = bm.size(0), C = bm.size(1);
  TORCH_CHECK(R * C <= INT32_MAX, "bitmap too large");
  auto iopt = bm.options().dtype(at::kInt);
  at::Tensor row_ptr = at::empty({R + 1}, iopt), row_cols = at::empty({R * C}, iopt);
  at::Tensor col_ptr = at::empty({C + 1}, iopt), col_rows = at::empty({R * C}, iopt);
  at::Tensor block_rows = at::empty({R * C}, iopt);
  at::Tensor nnz = at::empty({}, bm.options().dtype(at::kLong));
  check_cuda_error(capsparse_build_block_metadata(reinterpret_cast<const unsigned char*>(bm.data_ptr()), C, int(R),
                                                  int(C), row_ptr.data_ptr<int>(), row_cols.data_ptr<int>(),
                                                  col_ptr.data_ptr<int>(), col_rows.data_ptr<int>(),
                                                  block_rows.data_ptr<int>(),
                                                  reinterpret_cast<long long*>(nnz.data_ptr<int64_t>()),
                                                  at::cuda::getCurrentCUDAStream()),
                   "build_block_metadata");
  return {row_ptr, row_cols, col_ptr, col_rows, block_rows, nnz};
}

std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>> cap_contrastive_bank(
    const at::Tensor& q, const at::Tensor& bank, const at::Tensor& key_index, const c10::optional<at::Tensor>& extra_keys,
    const at::Tensor& query_ids, const at::Tensor& key_ids, const c10::optional<at::Tensor>& query_labels,
    const c10::optional<at::Tensor>& key_labels, const at::Tensor& exclude_index, double temperature,
    const std::string& normalization) {
  check_2d(q, "q");
  check_2d(bank, "bank");
  check_same_device(q, bank, "bank");
  const int64_t B = q.size(0), D = q.size(1), K = key_index.numel();
  TORCH_CHECK(bank.size(1) == D, "bank has dim ", bank.size(1), " but q has ", D);
  TORCH_CHECK(normalization == "official" || normalization == "supcon",
              "normalization: expected 'official' or 'supcon', got '", normalization, "'");
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0");
  check_index(key_index, "key_index", K, at::kLong);
  check_same_device(q, key_index, "key_index");
  at::Tensor extra;
  int64_t E = 0;
  if (extra_keys.has_value() && extra_keys->defined()) {
    extra = *extra_keys;
    check_2d(extra, "extra_keys");
    check_same_device(q, extra, "extra_keys");
    TORCH_CHECK(extra.size(1) == D, "extra_keys has dim ", extra.size(1), " but q has ", D);
    TORCH_CHECK(extra.scalar_type() == bank.scalar_type(), "extra_keys must have the bank's dtype");
    E = extra.size(0);
  }
  check_index(query_ids, "query_ids", B, at::kLong);
  check_index(key_ids, "key_ids", K + E, at::kLong);
  check_index(exclude_index, "exclude_index", B, at::kLong);
  check_same_device(q, query_ids, "query_ids");
  check_same_device(q, key_ids, "key_ids");
  check_same_device(q, exclude_index, "exclude_index");
  const bool has_labels = query_labels.has_value() && query_labels->defined() && key_labels.has_value() &&
                          key_labels->defined();
  if (has_labels) {
    check_index(*query_labels, "query_labels", B, at::kLong);
    check_index(*key_labels, "key_labels", K + E, at::kLong);
    check_same_device(q, *query_labels, "query_labels");
    check_same_device(q, *key_labels, "key_labels");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor loss_u = at::empty({}, fopt);
  at::Tensor grad_u = at::empty({B, D}, q.options());
  at::Tensor loss_s, grad_s;
  if (has_labels) {
    loss_s = at::empty({}, fopt);
    grad_s = at::empty({B, D}, q.options());
  }
  const size_t ws_bytes = capsparse_cap_contrastive_workspace_bytes(to_int(B, "B"), to_int(K + E, "K + E"),
                                                                    to_int(D, "D"), has_labels ? 1 : 0);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  check_cuda_error(
      capsparse_cap_contrastive(dtype_code(q, "q"), q.data_ptr(), q.stride(0), int(B), int(D),
                                dtype_code(bank, "bank"), bank.data_ptr(), bank.stride(0), i64(key_index), int(K),
                                extra.defined() ? extra.data_ptr() : nullptr, extra.defined() ? extra.stride(0) : 0,
                                int(E), i64(query_ids), i64(key_ids), has_labels ? i64(*query_labels) : nullptr,
                                has_labels ? i64(*key_labels) : nullptr, i64(exclude_index),
                                static_cast<float>(temperature), normalization == "official" ? 0 : 1,
                                loss_u.data_ptr<float>(), has_labels ? loss_s.data_ptr<float>() : nullptr,
                                grad_u.data_ptr(), has_labels ? grad_s.data_ptr() : nullptr, grad_u.stride(0),
                                ws.defined() ? ws.data_ptr() : nullptr, ws_bytes, at::cuda::getCurrentCUDAStream()),
      "cap_contrastive_bank");
  c10::optional<at::Tensor> ls, gs;
  if (has_labels) {
    ls = loss_s;
    gs = grad_s;
  }
  return {loss_u, ls, grad_u, gs};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "capsparse CUDA kernels (block-sparse linear, block metadata, fused CAP contrastive step)";
  m.def("bsl_forward", &bsl_forward, "block-sparse linear forward", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("row_ptr"), py::arg("row_cols"), py::arg("bm"), py::arg("bk"));
  m.def("bsl_grad_input", &bsl_grad_input, "block-sparse linear grad wrt x", py::arg("grad_y"), py::arg("weight"),
        py::arg("col_ptr"), py::arg("col_rows"), py::arg("bm"), py::arg("bk"));
  m.def("bsl_grad_weight", &bsl_grad_weight, "block-sparse linear grad wrt W (kept blocks, split-K)",
        py::arg("grad_y"), py::arg("x"), py::arg("block_rows"), py::arg("block_cols"), py::arg("nnz"), py::arg("bm"),
        py::arg("bk"));
  m.def("build_block_metadata", &build_block_metadata,
        "bitmap [R, C] -> (row_ptr, row_cols, col_ptr, col_rows, block_rows, nnz), no host sync", py::arg("bitmap"));
  m.def("cap_contrastive_bank", &cap_contrastive_bank, "fused CAP contrastive step with in-kernel bank gather",
        py::arg("q"), py::arg("bank"), py::arg("key_index"), py::arg("extra_keys"), py::arg("query_ids"),
        py::arg("key_ids"), py::arg("query_labels"), py::arg("key_labels"), py::arg("exclude_index"),
        py::arg("temperature"), py::arg("normalization"));
}
