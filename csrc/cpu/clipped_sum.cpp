// CPU implementations of bk::clipped_sum and bk::clipped_sum_ for the torch dispatcher.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "clipped_sum_common.h"
#include "cpu/clipped_sum_kernels.h"

namespace bk {
namespace {

template <typename scalar_t, typename kernel_scalar_t>
void run(const at::Tensor& a, const at::Tensor& g, const at::Tensor& c, const at::Tensor& w,
         const c10::optional<at::Tensor>& b) {
  using A = cpu::out_t<kernel_scalar_t>;
  static_assert(sizeof(scalar_t) == sizeof(kernel_scalar_t));
  const auto* a_ptr = reinterpret_cast<const kernel_scalar_t*>(a.const_data_ptr<scalar_t>());
  const auto* g_ptr = reinterpret_cast<const kernel_scalar_t*>(g.const_data_ptr<scalar_t>());
  cpu::clipped_sum<kernel_scalar_t>({a_ptr, a.stride(0), a.stride(1)},
                                    {g_ptr, g.stride(0), g.stride(1)}, c.const_data_ptr<A>(),
                                    w.mutable_data_ptr<A>(), b ? b->mutable_data_ptr<A>() : nullptr,
                                    a.size(0), a.size(1), a.size(2), g.size(2));
}

// The scaled copy of one chunk of examples stays within this many elements (16 MiB in fp32).
constexpr int64_t kScaledChunk = int64_t(1) << 22;

// float32/float64: the GEMM on torch's BLAS (MKL or oneDNN on x86, whatever torch was built
// with), which beats a hand-written kernel on CPUs with fast BLAS (measured 1.3-2.9x on an Intel
// Xeon with AVX-512; on the 2-core EPYC within noise of the kernel, see bench/ops). The clip
// factors scale the operand with fewer columns, one chunk of examples at a time, and each chunk
// is one addmm into w: no [B*T, max(d, p)] copy.
struct ScaledRows {
  at::Tensor a, g;  // [n*T, d], [n*T, p]: one of them scaled by c
  bool scaled_a;
};

ScaledRows scaled_rows(const at::Tensor& a, const at::Tensor& g, const at::Tensor& c) {
  const int64_t n = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  const bool scale_a = d <= p;
  const at::Tensor cn = c.view({n, 1, 1});
  return {(scale_a ? a * cn : a).reshape({n * T, d}), (scale_a ? g : g * cn).reshape({n * T, p}), scale_a};
}

// sum_b c_b sum_t g_b,t of the chunk's rows. With one position, g[:, 0] itself: torch's
// reduction over a dim of size 1 took 14 us on a [64, 1, 512] g, 2.5x the mv after it.
at::Tensor bias_sum(const ScaledRows& rows, const at::Tensor& g, const at::Tensor& c) {
  if (!rows.scaled_a) return rows.g.sum(0);
  return at::mv((g.size(1) == 1 ? g.select(1, 0) : g.sum(1)).t(), c);
}

int64_t examples_per_chunk(const at::Tensor& a, const at::Tensor& g) {
  const int64_t T = a.size(1), d = a.size(2), p = g.size(2);
  return std::max<int64_t>(1, kScaledChunk / std::max<int64_t>(T * std::min(d, p), 1));
}

void accumulate_blas(const at::Tensor& a, const at::Tensor& g, const at::Tensor& c, const at::Tensor& w,
                     const c10::optional<at::Tensor>& b) {
  const int64_t B = a.size(0), chunk = examples_per_chunk(a, g);
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    const at::Tensor gn = g.narrow(0, lo, n), cn = c.narrow(0, lo, n);
    const ScaledRows rows = scaled_rows(a.narrow(0, lo, n), gn, cn);
    w.addmm_(rows.g.t(), rows.a);  // into the caller's buffer
    if (b) b->add_(bias_sum(rows, gn, cn));
  }
}

// BK_CPU_CLIPPED_SUM=kernel forces the hand-written kernel for float32/float64 (for
// comparisons; bf16/fp16 always take it: BLAS would round its output to 16 bits).
bool use_blas() {
  static const bool blas = [] {
    const char* env = std::getenv("BK_CPU_CLIPPED_SUM");
    return env == nullptr || std::string(env) != "kernel";
  }();
  return blas;
}

bool blas_dtype(const at::Tensor& a) {
  return (a.scalar_type() == at::kDouble || a.scalar_type() == at::kFloat) && use_blas();
}

// Adds sum_b c_b g_b^T a_b into w (and sum_b c_b sum_t g_b,t into b), which hold the
// accumulation dtype and are contiguous.
void accumulate(const at::Tensor& a, const at::Tensor& g, const at::Tensor& c, const at::Tensor& w,
                const c10::optional<at::Tensor>& b) {
  if (blas_dtype(a)) {
    accumulate_blas(a, g, c, w, b);
    return;
  }
  switch (a.scalar_type()) {
    case at::kDouble: run<double, double>(a, g, c, w, b); break;
    case at::kFloat: run<float, float>(a, g, c, w, b); break;
    case at::kHalf: run<at::Half, cpu::fp16>(a, g, c, w, b); break;
    case at::kBFloat16: run<at::BFloat16, cpu::bf16>(a, g, c, w, b); break;
    default: TORCH_CHECK(false, "bk::clipped_sum: unsupported dtype ", a.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> clipped_sum_cpu(const at::Tensor& a_in, const at::Tensor& g_in,
                                                   const at::Tensor& c_in, bool bias) {
  const ClippedSumInputs in = prepare_clipped_sum(a_in, g_in, c_in, "bk::clipped_sum");
  if (blas_dtype(in.a) && in.a.size(0) <= examples_per_chunk(in.a, in.g)) {
    // One chunk: a plain mm into a fresh tensor (no zero fill to add into; this is the path of
    // every small layer's step, where the fill and addmm's extra pass showed in profiles).
    const ScaledRows rows = scaled_rows(in.a, in.g, in.c);
    return {at::mm(rows.g.t(), rows.a), bias ? bias_sum(rows, in.g, in.c) : at::empty({0}, in.c.options())};
  }
  at::Tensor w = at::zeros({in.p, in.d}, in.c.options());
  at::Tensor b = at::zeros({bias ? in.p : 0}, in.c.options());
  accumulate(in.a, in.g, in.c, w, bias ? c10::optional<at::Tensor>(b) : c10::nullopt);
  return {w, b};
}

// Mutable arguments as const references: the signature every backend registers must match.
void clipped_sum_cpu_(const at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias,
                      const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& c_in) {
  const ClippedSumInputs in = prepare_clipped_sum(a_in, g_in, c_in, "bk::clipped_sum_");
  check_clipped_sum_outputs(grad_weight, grad_bias, in, "bk::clipped_sum_");
  // Accumulate straight into buffers of the accumulation dtype; others get the sum added once.
  const bool direct_w = grad_weight.scalar_type() == in.c.scalar_type() && grad_weight.is_contiguous();
  const bool direct_b = !grad_bias || (grad_bias->scalar_type() == in.c.scalar_type() &&
                                       grad_bias->is_contiguous());
  if (direct_w && direct_b) {
    accumulate(in.a, in.g, in.c, grad_weight, grad_bias);
    return;
  }
  at::Tensor w = at::zeros({in.p, in.d}, in.c.options());
  c10::optional<at::Tensor> b;
  if (grad_bias) b = at::zeros({in.p}, in.c.options());
  accumulate(in.a, in.g, in.c, w, b);
  grad_weight.add_(w);
  if (grad_bias) grad_bias->add_(*b);
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CPU, m) {
  m.impl("clipped_sum", &clipped_sum_cpu);
  m.impl("clipped_sum_", &clipped_sum_cpu_);
}

}  // namespace bk
