"""Modules that transpose their batch-first input and run their own layers sequence-first.

Longformer's (and LED's) self-attention takes [B, T, d], transposes it to [T, B, d] and calls
its query, key and value Linears (and the global ones, on [G, B, d] rows of the global tokens)
on that; XLNetModel transposes its ids to [T, B] for its whole transformer. Under a batch-first
engine those layers would read dim 0 (the positions) as the examples and refuse. Here the
module's own forward runs unchanged, inside the engine's layout.sequence_first(): its layers
read the examples on dim 1, as with batch_first=False for that call only. Each bk layer takes
its example dim in its forward, so nothing else changes. XLNet's relative attention owns its
projections and takes the generic path, its inputs read on their sequence-first dims. A layer
inside that is not sequence-first gets its shapes checked as always (a wrong dim is refused,
except when T equals B: bk.verify is the check, and python_tests/test_hf_models runs it).
"""
from ._core import BKLayer, in_plain_forward
from ._made import mixin_class
from .families import register_layer
from .generic import GenericLayer, generic_class


class SequenceFirstInside(BKLayer):
    """In front of a module class whose forward runs its layers on [T, B, ...] inputs."""

    _bk_swap_without_parameters = True  # its Parameters are its children's

    def forward(self, *args, **kwargs):
        engine = self._bk_engine
        if engine is None or in_plain_forward():
            return super().forward(*args, **kwargs)
        with engine.layout.sequence_first():
            return super().forward(*args, **kwargs)


class _XLNetRelativeAttention(GenericLayer):
    """XLNet's attention owns its projections (q, k, v, o, r: [d, heads, head_dim] Parameters used in
    einsums) and biases: the generic path, recomputed per example, its inputs sequence-first
    (h and r [T, B, d]; the masks and segment matrix [T, T, B, *])."""

    def _bk_input_dim(self, t):
        return {3: 1, 4: 2}.get(t.dim(), 0)

    def _bk_output_dim(self, k, t):
        return 1 if t.dim() == 3 else 0


# (module, class name) of the modules whose forward transposes to sequence-first for its layers
_SEQUENCE_FIRST_CLASSES = {("transformers.models.longformer.modeling_longformer", "LongformerSelfAttention"),
                           ("transformers.models.led.modeling_led", "LEDEncoderSelfAttention"),
                           ("transformers.models.xlnet.modeling_xlnet", "XLNetModel")}

register_layer(None, lambda module: mixin_class(type(module), SequenceFirstInside),
               matches=lambda cls: (cls.__module__, cls.__name__) in _SEQUENCE_FIRST_CLASSES)
register_layer(None, lambda module: generic_class(type(module), mixin=_XLNetRelativeAttention),
               matches=lambda cls: (cls.__module__, cls.__name__) == ("transformers.models.xlnet.modeling_xlnet",
                                                                     "XLNetRelativeAttention"))
