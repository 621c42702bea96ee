// Ops built from the other ops, registered once for every device (CompositeImplicitAutograd):
// the clipping rule lives here and nowhere else; a whole step's noise in one call.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <tuple>

#include "checks.h"

namespace bk {
namespace {

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

}  // namespace bk
