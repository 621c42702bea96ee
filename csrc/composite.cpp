// Ops built from the other ops, registered once for every device (CompositeImplicitAutograd):
// the clipping rule lives here and nowhere else.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>

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

}  // namespace

TORCH_LIBRARY_IMPL(bk, CompositeImplicitAutograd, m) {
  m.impl("clip_factors", &clip_factors);
  m.impl("clipped_sum_layerwise", &clipped_sum_layerwise);
}

}  // namespace bk
