// The compiled module bk_kernels._C: op schemas for the torch dispatcher (implementations are
// registered per device in cpu/*.cpp and cuda/*_binding.cpp) and build information.
#include <torch/extension.h>

#include "cpu/norm_impl.h"
#include "cpu/norms_kernels.h"

#ifdef BK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef BK_VERSION
#define BK_VERSION "0.0.0+unknown"
#endif
#ifndef BK_CUDA_ARCHS
#define BK_CUDA_ARCHS ""
#endif

// Every op of the library, once. docs/OPS.md says what each computes; a:[B,T,d] is a layer's
// input, g:[B,T,p] its output gradient, c:[B] the clip factors. Sums and norms come out in
// float64 for float64 inputs, float32 otherwise; ops ending in _ accumulate into their
// first arguments.
TORCH_LIBRARY(bk, m) {
  // Per-example squared weight-gradient norms ||a_b^T g_b||_F^2.
  m.def("ghost_norm(Tensor a, Tensor g) -> Tensor");   // via Gram tiles, never B*T*T
  m.def("direct_norm(Tensor a, Tensor g) -> Tensor");  // via a_b^T g_b tiles, never B*d*p
  // Clipped weighted sums: grad_weight [p,d] = sum_b c_b g_b^T a_b, grad_bias [p].
  m.def("clipped_sum(Tensor a, Tensor g, Tensor c, bool bias) -> (Tensor, Tensor)");
  m.def("clipped_sum_(Tensor(a!) grad_weight, Tensor(b!)? grad_bias, Tensor a, Tensor g, "
        "Tensor c) -> ()");
  // Embeddings: ids [B,T] (int32/int64), g [B,T,d].
  m.def("embedding_norm(Tensor ids, Tensor g, int? padding_idx) -> Tensor");
  m.def("embedding_clipped_sum(Tensor ids, Tensor g, Tensor c, int num_embeddings, "
        "int? padding_idx, bool deterministic) -> Tensor");
  m.def("embedding_clipped_sum_(Tensor(a!) grad_weight, Tensor ids, Tensor g, Tensor c, "
        "int? padding_idx, bool deterministic) -> ()");
  // Norm layers: per-example affine gradients and their squared norms, xhat/g [B,T,C].
  m.def("norm_layer_grads(Tensor xhat, Tensor g, bool bias) -> (Tensor, Tensor, Tensor)");
  // Gaussian noise and the 1/B scale in one pass: grad = (grad + std * z) * scale.
  m.def("add_noise_(Tensor(a!) grad, float std, float scale, int seed, int offset) -> ()");
  // A whole step's noise in one call: grads[k] starts at offset + the numels of grads[0..k),
  // each rounded up to a multiple of 4 (the counters successive add_noise_ calls would take).
  m.def("add_noise_list_(Tensor(a!)[] grads, float std, float scale, int seed, int offset) -> ()");
  // Composites (csrc/composite.cpp), on every device.
  m.def("clip_factors(Tensor sq_norms, float threshold, str clip_fn, float gamma) -> Tensor");
  // A clipping unit's step in one call (the engine's): its [B] squared-norm terms summed in
  // float64 and scaled, their clip factors times out_scale, and whether every norm is finite
  // (a CPU kernel, cpu/clip_factors.cpp; the composite elsewhere).
  m.def("unit_clip_factors(Tensor[] terms, float sq_scale, float threshold, str clip_fn, float gamma, "
        "float out_scale) -> (Tensor, Tensor, Tensor)");
  m.def("clipped_sum_layerwise(Tensor a, Tensor g, bool bias, float threshold, str clip_fn, "
        "float gamma, str mode) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = BK_VERSION;
  info["torch_version"] = TORCH_VERSION;  // the torch this module was compiled against
#ifdef BK_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string(CUDART_VERSION % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  pybind11::list archs;
  std::string all = BK_CUDA_ARCHS, arch;
  for (char c : all + ";") {
    if (c == ';') {
      if (!arch.empty()) archs.append(arch);
      arch.clear();
    } else {
      arch += c;
    }
  }
  info["cuda_archs"] = archs;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["omp_max_threads"] = bk::cpu::max_threads();
  return info;
}

pybind11::list cpu_norm_choices() {
  pybind11::list rows;
  for (const auto& c : bk::cpu_norm_choices()) {
    pybind11::dict row;
    row["op"] = c.op;
    row["dtype"] = c.dtype;
    row["B"] = c.B;
    row["T"] = c.T;
    row["d"] = c.d;
    row["p"] = c.p;
    row["threads"] = c.threads;
    row["impl"] = c.impl;
    row["kernel_us"] = c.kernel_us;
    row["blas_us"] = c.blas_us;
    rows.append(row);
  }
  return rows;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bk_kernels compiled kernels; importing this module registers the torch.ops.bk ops";
  m.def("build_info", &build_info,
        "dict: version, torch_version, cuda, cuda_version, cuda_archs, openmp, omp_max_threads");
  m.def("set_cpu_norm_impl", &bk::set_cpu_norm_impl, pybind11::arg("mode"),
        "'auto' (time kernel and BLAS once per shape class), 'kernel' or 'blas'; forgets past choices");
  m.def("cpu_norm_impl", &bk::cpu_norm_impl, "the CPU norm implementation mode now in force");
  m.def("cpu_norm_choices", &cpu_norm_choices,
        "list of dict: each shape class's measured choice (op, dtype, B, T, d, p, threads, impl, "
        "kernel_us, blas_us)");
}
