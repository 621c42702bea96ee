"""Per-channel scales (LayerScale): y = x * gamma, gamma broadcast along one channel dim; and
per-channel shifts, y = x + beta (DeBERTa's q_bias/v_bias and its LayerNorm's bias).

Example b's gradient of gamma is sum over its other positions of g * x, a [B, C] tensor kept as
it is (a DenseUse): cheaper than the generic path's recompute of the module. bk.nn.scale is the
building block; timm's LayerScale/LayerScale2d and ConvNeXt block and transformers' ConvNextLayer
(whose forwards multiply by their gamma inline) use it, and so does ConvNeXt-V2's Global
Response Norm (with shift for its bias). timm's LayerNorm and LayerNorm2d go on bk's fused
LayerNorm here too.
"""
import torch

from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, in_plain_forward
from ._uses import DenseUse
from ._made import mixin_class, names_in_init, source_of, takes
from .families import GENERIC, register_layer
from .norm import GroupNorm, LayerNorm


class _ScaleFn(torch.autograd.Function):
    """x * gamma (a trained gamma: scale() multiplies by a frozen one directly)."""

    @staticmethod
    def forward(ctx, x, gamma, layer, dim):
        ctx.layer, ctx.gamma, ctx.dim = layer, gamma, dim
        ctx.save_for_backward(x, gamma)
        return x * gamma.view(_channel_shape(x, dim))

    @staticmethod
    def backward(ctx, g):
        x, gamma = ctx.saved_tensors
        grad_x = g * gamma.view(_channel_shape(g, ctx.dim)) if ctx.needs_input_grad[0] else None
        acc = accumulation_dtype(g.dtype)
        # a one-element gamma (timm's StarReLU, hgnet's affine) scales every channel: summed over all
        others = [d for d in range(1, g.dim()) if d != ctx.dim % g.dim() or gamma.numel() == 1]
        per_example = (g.to(acc) * x.to(acc)).sum(others) if others else g.to(acc) * x.to(acc)  # [B, C]
        # in gamma's own shape: [C], or [C, 1, 1] (timm FastViT's LayerScale2d)
        per_example = per_example.view(per_example.shape[0], *gamma.shape)
        if ctx.layer._bk_hand_off([(ctx.gamma, DenseUse(per_example))]):
            return grad_x, None, None, None
        return grad_x, per_example.sum(0).to(gamma.dtype), None, None


class _ShiftFn(torch.autograd.Function):
    """x + beta.view(shape); example b's gradient of beta sums g over b's positions."""

    @staticmethod
    def forward(ctx, x, beta, layer, shape):
        ctx.layer, ctx.beta, ctx.shape = layer, beta, shape
        return x + beta.view(shape)

    @staticmethod
    def backward(ctx, g):
        acc = accumulation_dtype(g.dtype)
        summed = [d for d in range(1, g.dim()) if ctx.shape[d] == 1]
        per_example = g.to(acc)
        if summed:  # (an empty dim list would sum over every dim)
            per_example = per_example.sum(summed, keepdim=True)
        per_example = per_example.reshape(g.shape[0], *ctx.beta.shape)
        if ctx.layer._bk_hand_off([(ctx.beta, DenseUse(per_example))]):
            return g, None, None, None
        return g, per_example.sum(0).to(ctx.beta.dtype), None, None


def shift(layer, x, beta, shape):
    """x + beta.view(shape) (shape: 1 on dim 0 and on the dims beta is broadcast along),
    book-kept as a use of `beta` owned by `layer`; x holds the examples on dim 0."""
    if not beta.requires_grad:
        return x + beta.view(shape)
    return _ShiftFn.apply(layer._bk_examples(x, 0), beta, layer, shape)


def per_example(layer, param, batch):
    """param repeated for each of `batch` examples ([batch, *param.shape]), a shift of zeros owned
    by `layer`: what each example reads from its own copy gives its own gradient of param (a
    frozen param: a plain repeat)."""
    return shift(layer, param.new_zeros(batch, *param.shape), param, (1, *param.shape))


def class_tokens(layer, x, token):
    """token [1, k, C] repeated for each example of x, as a shift of zeros (per-example grads);
    a frozen token is added as it is (timm's and transformers' class tokens, SigLIP's probe)."""
    return shift(layer, x.new_zeros(x.shape[0], *token.shape[1:]), token, (1, *token.shape[1:]))


def positions(layer, x, table):
    """x + table, a position table [1, *x.shape[1:]] (or broadcast to it) added to every example,
    book-kept per example by a shift (timm's pos_embed, transformers' and torchvision's ViT positions)."""
    return shift(layer, x, table, (1, *table.shape[1:]))


class _DebertaLayerNorm(BKLayer):
    """transformers' DebertaLayerNorm (v1): its own normalisation (in float32), then its
    weight * h + bias through scale and shift: the same arithmetic, per-example gradients with
    no recompute of the module."""

    def forward(self, hidden_states):
        if self._bk_bypassed():
            return super().forward(hidden_states)
        input_type = hidden_states.dtype
        h = hidden_states.float()
        mean = h.mean(-1, keepdim=True)
        variance = (h - mean).pow(2).mean(-1, keepdim=True)
        h = ((h - mean) / torch.sqrt(variance + self.variance_epsilon)).to(input_type)
        return shift(self, scale(self, h, self.weight, -1), self.bias, (1,) * (h.dim() - 1) + (-1,))


def _channel_shape(x, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    return shape


def scale(layer, x, gamma, dim=-1):
    """x * gamma with gamma [C] (or [C, 1, ..., 1]) along dim `dim` of x, book-kept as a use of
    `gamma` owned by `layer` (a bk.nn.BKLayer); x holds the examples on dim 0 (checked against
    the batch). A frozen gamma is a plain product."""
    if not gamma.requires_grad:
        return x * gamma.view(_channel_shape(x, dim))
    return _ScaleFn.apply(layer._bk_examples(x, 0), gamma, layer, dim)


class _TimmLayerScale(BKLayer):
    """timm's LayerScale (channels last) and LayerScale2d (NCHW)."""

    _bk_channel_dim = -1

    def forward(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self.gamma.requires_grad:
            return super().forward(x)
        # inplace=True: the scaled tensor is returned, x itself is left as it was (its value is
        # saved for gamma's per-example gradient); timm's blocks use the returned value
        return scale(self, x, self.gamma, self._bk_channel_dim)


class _TimmLayerScale2d(_TimmLayerScale):
    _bk_channel_dim = 1


class _HFLayerScale(BKLayer):
    """transformers' LayerScale of DINOv2 and its copies (DINOv3, EoMT, RADIO, RF-DETR):
    `hidden_state * self.lambda1` along the channels (it took the generic path: a recompute per
    block and per example for C numbers)."""

    def forward(self, hidden_state):
        if in_plain_forward() or self._bk_layout() is None or not self.lambda1.requires_grad:
            return super().forward(hidden_state)
        return scale(self, hidden_state, self.lambda1, -1)


def _hf_layer_scale_class(module):
    cls = type(module)
    if takes(cls, "forward", ["hidden_state"]) and "return hidden_state * self.lambda1" in source_of(cls.forward) and \
            [n for n, _ in module.named_parameters(recurse=False)] == ["lambda1"]:
        return mixin_class(cls, _HFLayerScale)
    return GENERIC


class _TimmConvNeXtBlock(BKLayer):
    """timm's ConvNeXtBlock: its forward, with the inline x.mul(gamma) book-kept by bk.nn.scale
    (the block owns gamma; its convolution, norm and MLP are bk layers of their own)."""

    def forward(self, x):
        if in_plain_forward() or self._bk_layout() is None or self.gamma is None or not self.gamma.requires_grad:
            return super().forward(x)
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = scale(self, x, self.gamma, 1)
        return self.drop_path(x) + self.shortcut(shortcut)


class _TimmResMLPBlock(BKLayer):
    """timm ResMLP's ResBlock: its forward, with the inline ls1 / ls2 products book-kept by
    bk.nn.scale (its Affine norms and Linear layers are bk layers of their own)."""

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        tokens = self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.drop_path(scale(self, tokens, self.ls1, -1))
        return x + self.drop_path(scale(self, self.mlp_channels(self.norm2(x)), self.ls2, -1))


class _HFConvNextLayer(BKLayer):
    """transformers' ConvNextLayer: its forward, with the inline layer_scale_parameter * features
    book-kept by bk.nn.scale (its convolutions, norm and Linear layers are bk layers)."""

    def forward(self, features):
        gamma = self.layer_scale_parameter
        if in_plain_forward() or self._bk_layout() is None or gamma is None or not gamma.requires_grad:
            return super().forward(features)
        residual = features
        features = self.layernorm(self.dwconv(features).permute(0, 2, 3, 1))  # (N, H, W, C)
        features = scale(self, self.pwconv2(self.act(self.pwconv1(features))), gamma, -1)
        return residual + self.drop_path(features.permute(0, 3, 1, 2))


class _GlobalResponseNorm(BKLayer):
    """ConvNeXt-V2's GRN, timm's GlobalResponseNorm and transformers' ConvNextV2GRN:
    x + bias + weight * (x * n), with n each channel's L2 norm over the example's positions
    divided by its mean over the channels (a map of the example alone). weight goes through
    bk.nn.scale and bias through shift: [B, C] per-example gradients, no recompute."""

    _bk_dims = ((1, 2), -1, (1, 1, 1, -1))  # positions, channels, the weight's broadcast shape (channels last)

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        positions, channels, shape = self._bk_dims
        norms = torch.linalg.vector_norm(x, ord=2, dim=positions, keepdim=True)
        normalized = x * (norms / (norms.mean(dim=channels, keepdim=True) + self.eps))
        return shift(self, scale(self, normalized, self.weight, channels), self.bias, shape) + x


class _TimmGlobalResponseNorm(_GlobalResponseNorm):
    @property
    def _bk_dims(self):
        return self.spatial_dim, self.channel_dim, self.wb_shape


class _HFConvNextV2GRN(_GlobalResponseNorm):
    eps = 1e-6  # transformers' constant


class _TimmMetaformerScale(BKLayer):
    """timm MetaFormer's Scale (PoolFormer, ConvFormer, CAFormer): x * scale.view(shape), shape
    (C, 1, 1) for NCHW or (C,)."""

    def forward(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self.scale.requires_grad:
            return super().forward(x)
        return scale(self, x, self.scale, -len(self.shape))


class _AffineOfParameters(BKLayer):
    """gamma * f(x) + beta with gamma and beta per channel (last dim) or one number each: timm's
    StarReLU (f = relu^2; MetaFormer), hgnet's LearnableAffineBlock and ResMLP's Affine (f = the
    identity). _bk_affine names the module's (gamma, beta) attributes."""

    _bk_affine = ("scale", "bias")

    def _bk_inner(self, x):
        return x

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        gamma, beta = (getattr(self, name) for name in self._bk_affine)
        y = scale(self, self._bk_inner(x), gamma, -1)
        return shift(self, y, beta, (1,) * (y.dim() - 1) + (-1 if beta.numel() > 1 else 1,))


class _TimmStarReLU(_AffineOfParameters):
    def _bk_inner(self, x):
        return self.relu(x) ** 2


class _TimmResMLPAffine(_AffineOfParameters):
    _bk_affine = ("alpha", "beta")


class _TimmLayerNorm2d(LayerNorm):
    """timm's LayerNorm2d (and torchvision's ConvNeXt LayerNorm2d): a LayerNorm over the channels
    of NCHW, on bk's fused LayerNorm."""

    def forward(self, x):
        if in_plain_forward():
            return super().forward(x)
        return self._bk_forward(x.permute(0, 2, 3, 1), self.bias).permute(0, 3, 1, 2)


class _TimmGroupNormAct(GroupNorm):
    """timm's GroupNormAct and GroupNorm1Act (what bk.replace_batchnorm makes of timm's
    BatchNormAct2d): bk's fused GroupNorm, then the module's own drop and act."""

    def forward(self, x):
        y = super().forward(x)  # bk's GroupNorm; in a plain forward timm's (drop and act included)
        return y if in_plain_forward() else self.act(self.drop(y))


class _HFBeitLayer(BKLayer):
    """transformers' BeitLayer (and Data2VecVisionLayer, its copy): its forward, with the inline
    layer scales lambda_1 * h and lambda_2 * h book-kept by bk.nn.scale (before: the whole layer,
    attention and MLP, was recomputed per example for those two vectors)."""

    def _bk_scaled(self, h, lam):
        return scale(self, h, lam, -1) if isinstance(lam, torch.nn.Parameter) else lam * h

    def forward(self, hidden_states, attention_mask=None, interpolate_pos_encoding=False, resolution=None, **kwargs):
        if in_plain_forward() or self._bk_layout() is None:
            return super().forward(hidden_states, attention_mask, interpolate_pos_encoding, resolution, **kwargs)
        # from here on transformers' forward (5.x), but for the two scales
        if self.relative_position_bias is not None:
            height, width = resolution
            window_size = (height // self.patch_size, width // self.patch_size)
            relative_position_bias = self.relative_position_bias(window_size, interpolate_pos_encoding,
                                                                 dim_size=hidden_states.shape[1])
            attention_mask = relative_position_bias + attention_mask if attention_mask is not None else \
                relative_position_bias
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = self.drop_path(self._bk_scaled(self.dropout(hidden_states), self.lambda_1)) + residual
        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return self.drop_path(self._bk_scaled(hidden_states, self.lambda_2)) + residual


class _HFData2VecVisionLayer(_HFBeitLayer):
    """transformers' Data2VecVisionLayer (5.x), which kept BEiT's older forward (the relative
    position bias handed to its attention, intermediate and output modules): that forward, with
    the two layer scales book-kept by bk.nn.scale (before: the whole layer recomputed per example)."""

    def forward(self, hidden_states, output_attentions=False, relative_position_bias=None,
                interpolate_pos_encoding=False, resolution=None):
        if in_plain_forward() or self._bk_layout() is None:
            return super(_HFBeitLayer, self).forward(hidden_states, output_attentions, relative_position_bias,
                                                     interpolate_pos_encoding, resolution)
        attention_outputs = self.attention(self.layernorm_before(hidden_states), output_attentions=output_attentions,
                                           relative_position_bias=relative_position_bias,
                                           interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)
        attention_output = attention_outputs[0]
        if self.lambda_1 is not None:
            attention_output = self._bk_scaled(attention_output, self.lambda_1)
        hidden_states = self.drop_path(attention_output) + hidden_states
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        if self.lambda_2 is not None:
            layer_output = self._bk_scaled(layer_output, self.lambda_2)
        return (self.drop_path(layer_output) + hidden_states,) + attention_outputs[1:]


def _hf_beit_layer_class(module):
    has = lambda *names: all(hasattr(module, a) for a in names)  # noqa: E731
    if takes(type(module), "forward", ["hidden_states", "attention_mask", "interpolate_pos_encoding", "resolution",
                                       "kwargs"]) and \
            has("attention", "layernorm_before", "layernorm_after", "mlp", "dropout", "drop_path", "lambda_1",
                "lambda_2", "relative_position_bias", "patch_size"):
        return mixin_class(type(module), _HFBeitLayer)
    if takes(type(module), "forward", ["hidden_states", "output_attentions", "relative_position_bias",
                                       "interpolate_pos_encoding", "resolution"]) and \
            has("attention", "layernorm_before", "layernorm_after", "intermediate", "output", "drop_path", "lambda_1",
                "lambda_2"):
        return mixin_class(type(module), _HFData2VecVisionLayer)
    return GENERIC  # another forward: recomputed per example


class _HFPoolFormerLayer(BKLayer):
    """transformers' PoolFormerLayer: its forward, with the inline per-channel layer scales
    (layer_scale_1/2 [C] on [B, C, H, W]) book-kept by bk.nn.scale along dim 1 (before: the whole
    layer recomputed per example)."""

    def forward(self, hidden_states):
        if in_plain_forward() or self._bk_layout() is None or not self.use_layer_scale:
            return super().forward(hidden_states)
        # from here on transformers' forward (5.x), but for the two scales
        pooled = self.pooling(self.before_norm(hidden_states))
        hidden_states = hidden_states + self.drop_path(scale(self, pooled, self.layer_scale_1, 1))
        layer_output = self.output(self.after_norm(hidden_states))
        return (hidden_states + self.drop_path(scale(self, layer_output, self.layer_scale_2, 1)),)


class _HFGroupNormActivation(GroupNorm):
    """transformers' BitGroupNormActivation: F.group_norm of the same attributes, then its
    activation (an Identity when it has none)."""

    def forward(self, x):
        y = super().forward(x)  # bk's GroupNorm; in a plain forward transformers' (activation included)
        return y if in_plain_forward() else self.activation(y)


def _timm_class(*names):
    return lambda cls: cls.__name__ in names and cls.__module__.startswith("timm.")


def _unless_fast_norm(mixin):
    """timm's norms with fast-norm set compute otherwise: the generic path then."""
    def plan(module):
        if getattr(module, "_fast_norm", False):
            from .generic import generic_class

            return generic_class(type(module))
        return mixin_class(type(module), mixin)
    return plan


register_layer(None, lambda module: mixin_class(type(module), _TimmLayerScale), matches=_timm_class("LayerScale"))
register_layer(None, _hf_layer_scale_class, matches=lambda cls: cls.__name__.endswith("LayerScale")
               and cls.__module__.startswith("transformers.models.") and "lambda1" in names_in_init(cls))
register_layer(None, _hf_beit_layer_class, matches=lambda cls: cls.__name__ in ("BeitLayer", "Data2VecVisionLayer")
               and cls.__module__.startswith("transformers.models."))
register_layer(None, lambda module: mixin_class(type(module), _HFPoolFormerLayer),
               matches=lambda cls: cls.__name__ == "PoolFormerLayer"
               and cls.__module__.startswith("transformers.models."))
register_layer(None, lambda module: mixin_class(type(module), _HFGroupNormActivation),
               matches=lambda cls: cls.__name__ == "BitGroupNormActivation" and cls.__module__.startswith(
                   "transformers.models."))
register_layer(None, lambda module: mixin_class(type(module), _TimmLayerScale2d), matches=_timm_class("LayerScale2d"))
register_layer(None, lambda module: mixin_class(type(module), _TimmConvNeXtBlock), matches=_timm_class("ConvNeXtBlock"))
# MetaFormer's NoBias variants: the same forwards with bias None
register_layer(None, _unless_fast_norm(_TimmLayerNorm2d),
               matches=_timm_class("LayerNorm2d", "LayerNorm2dNoBias"))
# timm's GroupNorm and GroupNorm1 (channels first in __init__) compute what torch's does:
# F.group_norm of the same attributes
register_layer(None, _unless_fast_norm(GroupNorm),
               matches=lambda cls: cls.__name__ in ("GroupNorm", "GroupNorm1") and cls.__module__ == "timm.layers.norm"
               or _timm_class("GroupNorm1NoBias")(cls))
register_layer(None, lambda module: mixin_class(type(module), _TimmMetaformerScale),
               matches=lambda cls: cls.__name__ == "Scale" and cls.__module__ == "timm.models.metaformer")
register_layer(None, lambda module: mixin_class(type(module), _TimmStarReLU), matches=_timm_class("StarReLU"))
register_layer(None, lambda module: mixin_class(type(module), _AffineOfParameters),
               matches=_timm_class("LearnableAffineBlock"))
register_layer(None, lambda module: mixin_class(type(module), _TimmResMLPBlock),
               matches=lambda cls: cls.__name__ == "ResBlock" and cls.__module__ == "timm.models.mlp_mixer")
register_layer(None, lambda module: mixin_class(type(module), _TimmResMLPAffine),
               matches=lambda cls: cls.__name__ == "Affine" and cls.__module__ == "timm.models.mlp_mixer")
register_layer(None, _unless_fast_norm(_TimmGroupNormAct),
               matches=lambda cls: cls.__name__ in ("GroupNormAct", "GroupNorm1Act") and cls.__module__.startswith("timm."))
# timm's LayerNorm overrides forward without calling torch's, but computes what torch's does
# (F.layer_norm of the same attributes): bk's LayerNorm goes in front of it (its plain forward is timm's)
register_layer(None, _unless_fast_norm(LayerNorm),
               matches=lambda cls: cls.__name__ == "LayerNorm" and cls.__module__ == "timm.layers.norm")
register_layer(None, lambda module: mixin_class(type(module), _DebertaLayerNorm),
               matches=lambda cls: cls.__name__ == "DebertaLayerNorm" and cls.__module__.startswith(
                   "transformers.models.deberta."))
register_layer(None, lambda module: mixin_class(type(module), _TimmGlobalResponseNorm),
               matches=_timm_class("GlobalResponseNorm"))
register_layer(None, lambda module: mixin_class(type(module), _HFConvNextV2GRN),
               matches=lambda cls: cls.__name__ == "ConvNextV2GRN" and cls.__module__.startswith(
                   "transformers.models.convnextv2."))
register_layer(None, lambda module: mixin_class(type(module), _HFConvNextLayer),
               matches=lambda cls: cls.__name__ == "ConvNextLayer" and cls.__module__.startswith(
                   "transformers.models.convnext."))
