// Which implementation a float32/float64 per-example norm runs on the CPU: the hand-written
// kernel (norms_kernels.cpp) or torch's BLAS on chunks of examples (norms.cpp). Which is faster
// depends on the CPU's BLAS as much as on the shape (the kernels win on a 2-core AMD EPYC, BLAS
// won on an Intel Xeon with AVX-512), so in "auto" mode both are timed the first time a shape
// class is seen, and the faster is kept for that class for the life of the process.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace bk {

// One measured (or forced) choice, as the bench and tests read it.
struct NormImplChoice {
  std::string op;     // "ghost_norm" | "direct_norm"
  std::string dtype;  // "float32" | "float64"
  int64_t B, T, d, p; // the shape whose call made the choice (its class is the log2 buckets)
  int threads;
  std::string impl;   // "kernel" | "blas"
  double kernel_us, blas_us;  // the best timed run of each (-1: not timed)
};

// "kernel" (default, or the BK_CPU_NORMS environment variable), "auto" or "blas" (where the
// chunked BLAS path applies; see norms.cpp). Setting a mode forgets every choice made so far.
void set_cpu_norm_impl(const std::string& mode);
std::string cpu_norm_impl();
std::vector<NormImplChoice> cpu_norm_choices();

}  // namespace bk
