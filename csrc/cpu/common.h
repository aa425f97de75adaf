// capsparse CPU kernels: shared declarations.
#pragma once
#include <torch/extension.h>
#include <optional>
#include <tuple>

namespace capsparse {

at::Tensor bsl_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& row_ptr, const at::Tensor& row_cols, int64_t bm, int64_t bk,
                       const std::optional<at::Tensor>& out);
at::Tensor bsl_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& col_ptr,
                          const at::Tensor& col_rows, int64_t bm, int64_t bk,
                          const std::optional<at::Tensor>& out);
at::Tensor bsl_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& block_rows,
                           const at::Tensor& block_cols, int64_t nnz, int64_t bm, int64_t bk, bool compact);
at::Tensor bsl_grad_bias(const at::Tensor& grad_y);
std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>> cap_contrastive(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_ids, const at::Tensor& key_ids,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
    const at::Tensor& exclude_index, double temperature, const std::string& normalization);

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t in_features);

// Dropout with a Philox mask of (seed, element index); also its own backward (the same masked scaling).
at::Tensor dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed);

// Tuning knobs (block-sparse: token tile, dW token chunk, loop order, strip width; CSR: tile, chunk, rows);
// 0 = automatic.
void set_tuning(int64_t token_tile, int64_t dw_chunk, int64_t order, int64_t strip);
void set_csr_tile(int64_t tile, int64_t chunk_bytes, int64_t rows);
std::string simd_info();

}  // namespace capsparse
