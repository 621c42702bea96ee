"""Modules that transpose their batch-first input and run their own layers sequence-first.

Longformer's self-attention takes [B, T, d], transposes it to [T, B, d] and calls its query,
key and value Linears (and the global ones, on [G, B, d] rows of the global tokens) on that.
Under a batch-first engine those layers would read dim 0 (the positions) as the examples and
refuse. Here the module's own forward runs unchanged, inside the engine's
layout.sequence_first(): its layers read the examples on dim 1, as with batch_first=False for
that call only. Each bk layer takes its example dim in its forward, so nothing else changes.
A layer inside that is not sequence-first gets its shapes checked as always (a wrong dim is
refused, except when T equals B: bk.verify is the check, and tests/test_hf_models runs it).
"""
from ._core import BKLayer, in_plain_forward
from ._made import mixin_class
from .families import register_layer


class SequenceFirstInside(BKLayer):
    """In front of a module class whose forward runs its layers on [T, B, ...] inputs."""

    _bk_swap_without_parameters = True  # its Parameters are its children's

    def forward(self, *args, **kwargs):
        engine = self._bk_engine
        if engine is None or in_plain_forward():
            return super().forward(*args, **kwargs)
        with engine.layout.sequence_first():
            return super().forward(*args, **kwargs)


# (module, class name) of the modules whose forward transposes to sequence-first for its layers
_SEQUENCE_FIRST_CLASSES = {("transformers.models.longformer.modeling_longformer", "LongformerSelfAttention"),
                           ("transformers.models.led.modeling_led", "LEDEncoderSelfAttention")}

register_layer(None, lambda module: mixin_class(type(module), SequenceFirstInside),
               matches=lambda cls: (cls.__module__, cls.__name__) in _SEQUENCE_FIRST_CLASSES)
