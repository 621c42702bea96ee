// CPU implementations of bk::ghost_norm and bk::direct_norm for the torch dispatcher: the
// hand-written kernels (norms_kernels.cpp) for every dtype, and for float32/float64 also torch's
// BLAS on chunks of examples, whichever is faster on this CPU for the shape (norm_impl.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include <ATen/Parallel.h>

#include "cpu/norm_impl.h"
#include "cpu/norms_kernels.h"
#include "checks.h"

namespace bk {
namespace {

template <typename scalar_t, typename kernel_scalar_t, typename Kernel>
void run(const at::Tensor& a, const at::Tensor& g, at::Tensor& out, Kernel kernel) {
  // at::Half / at::BFloat16 have the same 16-bit layout as the kernels' fp16 / bf16.
  static_assert(sizeof(scalar_t) == sizeof(kernel_scalar_t));
  const auto* a_ptr = reinterpret_cast<const kernel_scalar_t*>(a.const_data_ptr<scalar_t>());
  const auto* g_ptr = reinterpret_cast<const kernel_scalar_t*>(g.const_data_ptr<scalar_t>());
  cpu::Operand3d<kernel_scalar_t> ao{a_ptr, a.stride(0), a.stride(1)};
  cpu::Operand3d<kernel_scalar_t> go{g_ptr, g.stride(0), g.stride(1)};
  kernel(ao, go, out.mutable_data_ptr<cpu::out_t<kernel_scalar_t>>(), a.size(0), a.size(1),
         a.size(2), g.size(2));
}

template <template <typename> class Fn>
at::Tensor norm_kernel(const at::Tensor& a, const at::Tensor& g, const char* op) {
  at::Tensor out = norm_output(a);
  switch (a.scalar_type()) {
    case at::kDouble: run<double, double>(a, g, out, Fn<double>::call); break;
    case at::kFloat: run<float, float>(a, g, out, Fn<float>::call); break;
    case at::kHalf: run<at::Half, cpu::fp16>(a, g, out, Fn<cpu::fp16>::call); break;
    case at::kBFloat16: run<at::BFloat16, cpu::bf16>(a, g, out, Fn<cpu::bf16>::call); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", a.scalar_type());
  }
  return out;
}

template <typename S>
struct GhostKernel {
  static constexpr auto call = &cpu::ghost_norm<S>;
};
template <typename S>
struct DirectKernel {
  static constexpr auto call = &cpu::direct_norm<S>;
};

// The BLAS paths hold one chunk of examples' Gram matrices (ghost: two [n, T, T]) or gradients
// (direct: [n, d, p]), each within this many elements (16 MiB in float32): never B*T*T or B*d*p.
constexpr int64_t kChunkElems = int64_t(1) << 22;

// sum over (s, t) of <a_s, a_t> <g_s, g_t>, per example.
at::Tensor ghost_norm_blas(const at::Tensor& a, const at::Tensor& g) {
  const int64_t B = a.size(0), T = a.size(1), chunk = std::max<int64_t>(1, kChunkElems / (T * T));
  at::Tensor out = norm_output(a);
  const at::Tensor gram_a = at::empty({std::min(B, chunk), T, T}, a.options());
  const at::Tensor gram_g = at::empty_like(gram_a);
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    const at::Tensor an = a.narrow(0, lo, n), gn = g.narrow(0, lo, n);
    at::Tensor ga = gram_a.narrow(0, 0, n), gg = gram_g.narrow(0, 0, n);
    at::bmm_out(ga, an, an.transpose(1, 2));
    at::bmm_out(gg, gn, gn.transpose(1, 2));
    at::Tensor out_n = out.narrow(0, lo, n);
    at::sum_out(out_n, ga.mul_(gg), {1, 2});
  }
  return out;
}

// ||a_b^T g_b||^2 from the per-example gradients, one chunk of examples at a time.
at::Tensor direct_norm_blas(const at::Tensor& a, const at::Tensor& g) {
  const int64_t B = a.size(0), d = a.size(2), p = g.size(2);
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / (d * p));
  at::Tensor out = norm_output(a);
  const at::Tensor grads = at::empty({std::min(B, chunk), d, p}, a.options());
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    at::Tensor gr = grads.narrow(0, 0, n);
    at::bmm_out(gr, a.narrow(0, lo, n).transpose(1, 2), g.narrow(0, lo, n));
    at::Tensor out_n = out.narrow(0, lo, n);
    at::sum_out(out_n, gr.square_(), {1, 2});
  }
  return out;
}

// ---- choosing between them ----

enum class Mode { kAuto, kKernel, kBlas };

Mode parse_mode(const std::string& s, const char* what) {
  TORCH_CHECK(s == "auto" || s == "kernel" || s == "blas", what,
              " must be 'auto', 'kernel' or 'blas', got '", s, "'");
  return s == "kernel" ? Mode::kKernel : (s == "blas" ? Mode::kBlas : Mode::kAuto);
}

Mode initial_mode() {
  const char* env = std::getenv("BK_CPU_NORMS");
  // The default is the kernels: the same path in every process, so a resumed or repeated run is
  // bitwise the same. "auto" times per process and may pick differently between processes.
  return (env == nullptr || *env == '\0') ? Mode::kKernel : parse_mode(env, "BK_CPU_NORMS");
}

// A shape class: sizes that round up to the same powers of two share a choice.
using Key = std::tuple<bool /*direct*/, int /*dtype*/, int, int, int, int /*log2 B*/, int /*threads*/>;

int log2_bucket(int64_t n) {
  int k = 0;
  while ((int64_t(1) << k) < n && k < 62) ++k;
  return k;
}

struct Chooser {
  std::mutex lock;
  bool initialized = false;
  Mode mode = Mode::kAuto;
  std::map<Key, NormImplChoice> choices;

  Mode current() {  // under lock
    if (!initialized) {
      mode = initial_mode();
      initialized = true;
    }
    return mode;
  }
};

Chooser& chooser() {
  static Chooser c;
  return c;
}

double elapsed_us(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - since).count();
}

// The norms of (a, g) by the implementation chosen for their shape class; the first call of a
// class in "auto" mode times both and returns the kernel's result.
template <template <typename> class Kernel>
at::Tensor choose_and_run(const at::Tensor& a, const at::Tensor& g, bool direct,
                          at::Tensor (*blas)(const at::Tensor&, const at::Tensor&)) {
  const char* op = direct ? "bk::direct_norm" : "bk::ghost_norm";
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  const bool float_dtype = a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble;
  // bf16/fp16 stay on the kernels (BLAS would round the Gram/gradient entries to 16 bits);
  // T = 1 is a sum of squares per row, which no GEMM speeds up; one example's Gram matrices or
  // gradient must fit a chunk.
  const bool blas_applies = float_dtype && T > 1 && B > 0 &&
                            (direct ? d * p : T * T) <= kChunkElems;
  auto kernel = [&] { return norm_kernel<Kernel>(a, g, op); };
  if (!blas_applies) return kernel();

  Chooser& c = chooser();
  const int threads = at::get_num_threads();
  const Key key{direct, int(a.scalar_type()), log2_bucket(T), log2_bucket(d), log2_bucket(p),
                log2_bucket(std::min<int64_t>(B, 1024)), threads};
  Mode mode;
  {
    std::lock_guard<std::mutex> guard(c.lock);
    mode = c.current();
    if (mode == Mode::kAuto) {
      const auto found = c.choices.find(key);
      if (found != c.choices.end()) return found->second.impl == "blas" ? blas(a, g) : kernel();
    }
  }
  if (mode == Mode::kKernel) return kernel();
  if (mode == Mode::kBlas) return blas(a, g);

  // Time each: a first run (caches, BLAS start-up), then the best of two more, interleaved. A
  // shape whose first runs already took long keeps those times rather than spending more.
  auto start = std::chrono::steady_clock::now();
  at::Tensor out = kernel();
  double kernel_us = elapsed_us(start);
  start = std::chrono::steady_clock::now();
  blas(a, g);
  double blas_us = elapsed_us(start);
  if (kernel_us + blas_us < 50e3) {
    kernel_us = blas_us = INFINITY;
    for (int rep = 0; rep < 2; ++rep) {
      start = std::chrono::steady_clock::now();
      kernel();
      kernel_us = std::min(kernel_us, elapsed_us(start));
      start = std::chrono::steady_clock::now();
      blas(a, g);
      blas_us = std::min(blas_us, elapsed_us(start));
    }
  }
  NormImplChoice made{direct ? "direct_norm" : "ghost_norm", a.scalar_type() == at::kFloat ? "float32" : "float64",
                      B, T, d, p, threads, blas_us < kernel_us ? "blas" : "kernel", kernel_us, blas_us};
  {
    std::lock_guard<std::mutex> guard(c.lock);
    if (c.current() == Mode::kAuto) c.choices.emplace(key, made);
  }
  return out;
}

at::Tensor ghost_norm_cpu(const at::Tensor& a_in, const at::Tensor& g_in) {
  check_norm_inputs(a_in, g_in, "bk::ghost_norm");
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  return choose_and_run<GhostKernel>(a, g, false, &ghost_norm_blas);
}
at::Tensor direct_norm_cpu(const at::Tensor& a_in, const at::Tensor& g_in) {
  check_norm_inputs(a_in, g_in, "bk::direct_norm");
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  return choose_and_run<DirectKernel>(a, g, true, &direct_norm_blas);
}

}  // namespace

void set_cpu_norm_impl(const std::string& mode) {
  const Mode parsed = parse_mode(mode, "the CPU norm implementation");
  Chooser& c = chooser();
  std::lock_guard<std::mutex> guard(c.lock);
  c.mode = parsed;
  c.initialized = true;
  c.choices.clear();
}

std::string cpu_norm_impl() {
  Chooser& c = chooser();
  std::lock_guard<std::mutex> guard(c.lock);
  switch (c.current()) {
    case Mode::kKernel: return "kernel";
    case Mode::kBlas: return "blas";
    default: return "auto";
  }
}

std::vector<NormImplChoice> cpu_norm_choices() {
  Chooser& c = chooser();
  std::lock_guard<std::mutex> guard(c.lock);
  std::vector<NormImplChoice> all;
  for (const auto& entry : c.choices) all.push_back(entry.second);
  return all;
}

TORCH_LIBRARY_IMPL(bk, CPU, m) {
  m.impl("ghost_norm", &ghost_norm_cpu);
  m.impl("direct_norm", &direct_norm_cpu);
}

}  // namespace bk
