// The compiled module bk_kernels._C: op schemas for the torch dispatcher (implementations are
// registered per device in cpu/*.cpp and cuda/*_binding.cpp) and build information.
#include <torch/extension.h>

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

TORCH_LIBRARY(bk, m) {
  // out[b] = ||a_b^T g_b||_F^2 for a:[B,T,d], g:[B,T,p]: the squared norm of example b's
  // weight gradient, from the layer input a and output gradient g. Float64 out for float64
  // in, float32 otherwise.
  m.def("ghost_norm(Tensor a, Tensor g) -> Tensor");   // via Gram tiles, never B*T*T
  m.def("direct_norm(Tensor a, Tensor g) -> Tensor");  // via a_b^T g_b tiles, never B*d*p
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bk_kernels compiled kernels; importing this module registers the torch.ops.bk ops";
  m.def("build_info", &build_info,
        "dict: version, torch_version, cuda, cuda_version, cuda_archs, openmp, omp_max_threads");
}
