// The single Python module of the C++ CPU kernels: capsparse._C.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "capsparse CPU kernels (block-sparse and CSR linear, CAP contrastive loss, dropout)";
  m.def("bsl_forward", &capsparse::bsl_forward, "block-sparse linear forward", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("row_ptr"), py::arg("row_cols"), py::arg("bm"), py::arg("bk"),
        py::arg("out") = py::none());
  m.def("bsl_grad_input", &capsparse::bsl_grad_input, "block-sparse linear dX", py::arg("grad_y"),
        py::arg("weight"), py::arg("col_ptr"), py::arg("col_rows"), py::arg("bm"), py::arg("bk"),
        py::arg("out") = py::none());
  m.def("bsl_grad_weight", &capsparse::bsl_grad_weight,
        "block-sparse linear dW on kept blocks: dense [N, K] (zeros elsewhere) or compact [nnz, bm, bk]",
        py::arg("grad_y"), py::arg("x"), py::arg("block_rows"), py::arg("block_cols"), py::arg("nnz"),
        py::arg("bm"), py::arg("bk"), py::arg("compact") = false);
  m.def("bsl_grad_bias", &capsparse::bsl_grad_bias, "block-sparse linear db: grad_y summed over tokens",
        py::arg("grad_y"));
  m.def("csr_linear", &capsparse::csr_linear, "element-sparse (CSR) linear forward, inference",
        py::arg("x"), py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"), py::arg("bias"),
        py::arg("in_features"));
  m.def("cap_contrastive", &capsparse::cap_contrastive, "CAP contrastive losses and grads wrt q",
        py::arg("q"), py::arg("k"), py::arg("query_ids"), py::arg("key_ids"), py::arg("query_labels"),
        py::arg("key_labels"), py::arg("exclude_index"), py::arg("temperature"), py::arg("normalization"));
  m.def("dropout_apply", &capsparse::dropout_apply, "dropout with a Philox mask of (seed, index); its own backward",
        py::arg("x"), py::arg("p"), py::arg("seed"));
  m.def("set_tuning", &capsparse::set_tuning, "token tile / dW chunk / loop order / strip width (0 = automatic)",
        py::arg("token_tile"), py::arg("dw_chunk"), py::arg("order") = 0, py::arg("strip") = 0);
  m.def("set_csr_tile", &capsparse::set_csr_tile, "CSR token tile / column-chunk bytes / rows at a time (0 = automatic)",
        py::arg("tile"), py::arg("chunk_bytes") = 0, py::arg("rows") = 0);
  m.def("simd_info", &capsparse::simd_info);
}
