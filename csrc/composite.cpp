// Ops built from the other ops, registered once for every device (CompositeImplicitAutograd):
// the clipping rule (also followed, element by element, by the CPU kernel of unit_clip_factors
// in cpu/clip_factors.cpp); a whole step's noise in one call. And the composite of a clipping
// unit's step (unit_clip_factors) for the devices without a kernel of their own
// (CompositeExplicitAutograd).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <tuple>

#include "checks.h"
#include "composite.h"

namespace bk {

// C_b from squared norms. abadi: min(1, R/(n+1e-6)); automatic (AUTO-S): R/(n+gamma);
// normalized: R/(n+1e-6); n = ||g_b||.
at::Tensor clip_factors(const at::Tensor& sq_norms, double threshold, c10::string_view clip_fn,
                        double gamma) {
  TORCH_CHECK(threshold > 0, "bk::clip_factors: the threshold (max_grad_norm) must be positive, got ",
              threshold);
  const at::Tensor norms = sq_norms.clamp_min(0).sqrt();
  if (clip_fn == "abadi") return (threshold / (norms + 1e-6)).clamp_max(1.0);
  if (clip_fn == "automatic") {
    TORCH_CHECK(gamma > 0, "bk::clip_factors: automatic clipping needs gamma > 0, got ", gamma);
    return threshold / (norms + gamma);
  }
  if (clip_fn == "normalized") return threshold / (norms + 1e-6);
  TORCH_CHECK(false, "bk::clip_factors: clip_fn must be \"abadi\", \"automatic\" or \"normalized\", got \"",
              std::string(clip_fn), "\"");
}

int64_t check_unit_clip_args(at::TensorList terms, double threshold, c10::string_view clip_fn, double gamma,
                             const char* op) {
  TORCH_CHECK(!terms.empty(), op, ": terms must hold at least one [B] tensor");
  const int64_t B = terms[0].dim() == 1 ? terms[0].size(0) : -1;
  for (const at::Tensor& t : terms) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": terms must be 1-D tensors of one length [B], got shapes ",
                terms[0].sizes(), " and ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": terms must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.device() == terms[0].device(), op, ": terms must be on one device, got ", terms[0].device(),
                " and ", t.device());
  }
  TORCH_CHECK(threshold > 0, op, ": the threshold (max_grad_norm) must be positive, got ", threshold);
  TORCH_CHECK(clip_fn == "abadi" || clip_fn == "automatic" || clip_fn == "normalized", op,
              ": clip_fn must be \"abadi\", \"automatic\" or \"normalized\", got \"", std::string(clip_fn), "\"");
  TORCH_CHECK(clip_fn != "automatic" || gamma > 0, op, ": automatic clipping needs gamma > 0, got ", gamma);
  return B;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unit_clip_factors_composite(
    at::TensorList terms, double sq_scale, double threshold, c10::string_view clip_fn, double gamma,
    double out_scale) {
  check_unit_clip_args(terms, threshold, clip_fn, gamma, "bk::unit_clip_factors");
  const at::Tensor sum = terms.size() == 1 ? terms[0].to(at::kDouble)
                                           : at::stack(terms).sum(0, false, at::kDouble);
  const at::Tensor sq_norms = sum * sq_scale;
  return {sq_norms, clip_factors(sq_norms, threshold, clip_fn, gamma) * out_scale,
          at::isfinite(sq_norms).all()};
}

namespace {

// One layer as its own clipping unit: its per-example norms (weight and bias), clip factors
// and clipped sums in one call, so g need not be kept after the layer's backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clipped_sum_layerwise(
    const at::Tensor& a, const at::Tensor& g, bool bias, double threshold,
    c10::string_view clip_fn, double gamma, c10::string_view mode) {
  static const auto ghost = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("bk::ghost_norm", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static const auto direct = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("bk::direct_norm", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static const auto clipped =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bk::clipped_sum", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, bool)>();
  TORCH_CHECK(mode == "ghost" || mode == "direct",
              "bk::clipped_sum_layerwise: mode must be \"ghost\" or \"direct\", got \"",
              std::string(mode), "\"");
  at::Tensor sq_norms = mode == "ghost" ? ghost.call(a, g) : direct.call(a, g);
  if (bias) sq_norms = sq_norms + g.sum(1, false, sq_norms.scalar_type()).square().sum(1);
  at::Tensor c = clip_factors(sq_norms, threshold, clip_fn, gamma);
  auto [grad_weight, grad_bias] = clipped.call(a, g, c, bias);
  return {grad_weight, grad_bias, sq_norms, c};
}

// Every gradient of a step noised by bk::add_noise_ on its own device, in one call from Python
// (one call per parameter cost a few microseconds each in the engine's step).
void add_noise_list_(at::TensorList grads, double std, double scale, int64_t seed, int64_t offset) {
  static const auto add_noise = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("bk::add_noise_", "")
                                    .typed<void(const at::Tensor&, double, double, int64_t, int64_t)>();
  constexpr const char* op = "bk::add_noise_list_";
  // Everything is checked first: an error found halfway would leave some gradients noised.
  int64_t end = offset;
  for (const at::Tensor& grad : grads) {
    check_add_noise_args(grad, std, scale, end, op);
    const int64_t span = (grad.numel() + 3) / 4 * 4;
    TORCH_CHECK(end <= std::numeric_limits<int64_t>::max() - span, op, ": offset ", offset,
                " plus the gradients' elements overflows int64");
    end += span;
  }
  for (const at::Tensor& grad : grads) {
    add_noise.call(grad, std, scale, seed, offset);
    offset += (grad.numel() + 3) / 4 * 4;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CompositeImplicitAutograd, m) {
  m.impl("clip_factors", &clip_factors);
  m.impl("clipped_sum_layerwise", &clipped_sum_layerwise);
  m.impl("add_noise_list_", &add_noise_list_);
}

TORCH_LIBRARY_IMPL(bk, CompositeExplicitAutograd, m) {
  m.impl("unit_clip_factors", &unit_clip_factors_composite);
}

}  // namespace bk
