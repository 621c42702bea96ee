"""Kernels, one file per op. Every op takes `backend=`: "auto", "cpu", "cuda", "triton" or
"torch" (chunked pure PyTorch), and has a pure-PyTorch float64 `<op>_ref` beside it.
docs/OPS.md lists the dispatcher ops (torch.ops.bk.*) behind them."""
from ._backend import BACKENDS, available_backends
from .add_noise import add_noise_, add_noise_list_, add_noise_ref
from .clipped_sum import clipped_sum, clipped_sum_ref
from .conv import conv_clipped_sum, conv_norm, conv_per_example_grads, conv_per_example_grads_ref
from .direct_norm import direct_norm, direct_norm_ref
from .embedding import embedding_clipped_sum, embedding_clipped_sum_ref, embedding_norm, embedding_norm_ref
from .ghost_norm import ghost_norm, ghost_norm_ref
from .layerwise import clipped_sum_layerwise
from .linear_norm import choose_mode, cpu_norm_choices, cpu_norm_impl, linear_norm, set_cpu_norm_impl, use_ghost
from .norm_layer import norm_layer_grads, norm_layer_grads_ref

__all__ = [
    "BACKENDS",
    "add_noise_",
    "add_noise_list_",
    "add_noise_ref",
    "available_backends",
    "choose_mode",
    "clipped_sum",
    "clipped_sum_layerwise",
    "clipped_sum_ref",
    "conv_clipped_sum",
    "cpu_norm_choices",
    "cpu_norm_impl",
    "conv_norm",
    "conv_per_example_grads",
    "conv_per_example_grads_ref",
    "direct_norm",
    "direct_norm_ref",
    "embedding_clipped_sum",
    "embedding_clipped_sum_ref",
    "embedding_norm",
    "embedding_norm_ref",
    "ghost_norm",
    "ghost_norm_ref",
    "linear_norm",
    "norm_layer_grads",
    "norm_layer_grads_ref",
    "set_cpu_norm_impl",
    "use_ghost",
]
