"""Drop-in layers: subclasses of the torch originals (same constructor, parameters and
state_dict) whose backward book-keeps for the privacy engine instead of forming weight
gradients. bk.convert(model) swaps them in place."""
from ._core import BKLayer, in_plain_forward, plain_forward
from .attention import GenericMultiheadAttention, MultiheadAttention
from .conv import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from . import std_conv  # noqa: F401  (register timm's weight-standardized convolutions)
from .embedding import Embedding
from .embedding_bag import EmbeddingBag
from .generic import GenericLayer
from .families import register_layer
from .linear import Linear, linear
from . import deberta, moe  # noqa: F401  (register transformers' DeBERTa-v2 attention, MoE experts)
from . import timm_tokens  # noqa: F401  (register timm roots owning tokens: CaiT, PiT)
from . import sequence_first  # noqa: F401  (register Longformer, LED, XLNet: layers run sequence-first)
from . import speech  # noqa: F401  (register transformers' speech encoders: SpecAugment, WavLM, conformers)
from . import hf_tokens  # noqa: F401  (register transformers' modules owning a learned query: SigLIP's pooling head)
from . import torchvision_models  # noqa: F401  (register torchvision's ViT, Swin, ConvNeXt, MaxViT modules)
from . import mamba  # noqa: F401  (register transformers' Mamba, Mamba-2 mixers and their copies)
from . import gated_delta_net  # noqa: F401  (register transformers' gated delta nets: Qwen3-Next, Qwen 3.5)
from . import hf_rmsnorm  # noqa: F401  (register transformers' RMSNorm classes: Llama's and its copies)
from . import hf_router  # noqa: F401  (register transformers' MoE top-k routers: Mixtral's and its copies)
from . import patch_rows  # noqa: F401  (register GLM-4V's position table; the vision towers whose rows are patches)
from .layer_scale import scale
from .frozen_batchnorm import FrozenBatchNorm
from .recurrent import GRU, LSTM, RNN
from .norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm

__all__ = [
    "BKLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "EmbeddingBag",
    "FrozenBatchNorm",
    "GenericLayer",
    "GenericMultiheadAttention",
    "GRU",
    "LSTM",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "RMSNorm",
    "RNN",
    "linear",
    "register_layer",
    "scale",
    "in_plain_forward",
    "plain_forward",
]
