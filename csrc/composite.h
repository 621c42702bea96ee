// The clipping rule (composite.cpp), for the kernels that follow it on their own device.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace bk {

// C_b from squared norms (bk::clip_factors).
at::Tensor clip_factors(const at::Tensor& sq_norms, double threshold, c10::string_view clip_fn, double gamma);

// bk::unit_clip_factors' argument checks; returns B.
int64_t check_unit_clip_args(at::TensorList terms, double threshold, c10::string_view clip_fn, double gamma,
                             const char* op);

// A clipping unit's [B] squared-norm terms (each use's own norm, 2x each cross term) to
// (sq_norms = sq_scale * their sum in float64, clip_factors(sq_norms) * out_scale in float64,
// whether every sq_norm is finite, a 0-dim bool), from ops: bk::unit_clip_factors on the
// devices without a kernel of their own, and the CPU kernel's for 16-bit terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unit_clip_factors_composite(
    at::TensorList terms, double sq_scale, double threshold, c10::string_view clip_fn, double gamma,
    double out_scale);

}  // namespace bk
