"""timm models whose root owns tokens used inline: CaiT, PiT, Visformer, VOLO, CrossViT, XCiT,
ConViT, CoaT. The class tokens and position embeddings are Parameters of the root model, used in its
forward_features (or _embed, forward_cls, forward_tokens). Left alone, the root took the generic
path: a recompute of the WHOLE model per example (CaiT-XXS24 2.9x, PiT-Ti 2.8x non-private on the
CPU). Here those methods are timm's (timm 1.0), with the class token made per example by a shift
of zeros and the positions added by a shift, as BEiT's root in attention.py. The blocks' own
Parameters used inline go through bk.nn.scale (CaiT's and XCiT's layer scales, XCiT's
temperature) or a Function of their own (ConViT's gating).

A module whose methods or own Parameters differ from what is read here keeps the generic path
(exact, slow)."""
import torch

from ..ops._norm_common import accumulation_dtype
from ._core import BKLayer, in_plain_forward
from ._made import mixin_class, takes as _takes
from ._uses import DenseUse
from .attention import _own, _timm_block, _timm_blocks
from .families import GENERIC, register_layer
from .layer_scale import class_tokens as _class_tokens, positions, scale


def _with_class_tokens(layer, x, token):
    """x with the class token(s) prepended along dim 1 (timm's cat of token.expand(B, -1, -1))."""
    return torch.cat((_class_tokens(layer, x, token), x), dim=1)


def _class_attention(layer, x, token, blocks):
    """The class token prepended, then the class-attention blocks (VOLO's and XCiT's forward_cls)."""
    x = _with_class_tokens(layer, x, token)
    for block in blocks:
        x = _timm_block(layer, block, x)
    return x



class _TimmCaitRoot(BKLayer):
    def forward_features(self, x):
        if self._bk_bypassed():
            return super().forward_features(x)
        x = _timm_blocks(self, self.blocks, self.pos_drop(positions(self, self.patch_embed(x), self.pos_embed)))
        if self.blocks_token_only is not None:
            cls_tokens = _class_tokens(self, x, self.cls_token)
            for blk in self.blocks_token_only:
                cls_tokens = blk(x, cls_tokens)
            x = torch.cat((cls_tokens, x), dim=1)
        return self.norm(x)


class _TimmCaitBlock(BKLayer):
    """LayerScaleBlock: x + gamma_1 * attn(norm1(x)), then the MLP likewise."""

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        x = x + self.drop_path(scale(self, self.attn(self.norm1(x)), self.gamma_1, -1))
        return x + self.drop_path(scale(self, self.mlp(self.norm2(x)), self.gamma_2, -1))


class _TimmCaitClassBlock(BKLayer):
    """LayerScaleBlockClassAttn: the class token attends to itself and the patches."""

    def forward(self, x, x_cls):
        if self._bk_bypassed():
            return super().forward(x, x_cls)
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.drop_path(scale(self, self.attn(self.norm1(u)), self.gamma_1, -1))
        return x_cls + self.drop_path(scale(self, self.mlp(self.norm2(x_cls)), self.gamma_2, -1))


class _TimmPitRoot(BKLayer):
    def forward_features(self, x):
        if self._bk_bypassed():
            return super().forward_features(x)
        x = self.pos_drop(positions(self, self.patch_embed(x), self.pos_embed))
        x, cls_tokens = self.transformers((x, _class_tokens(self, x, self.cls_token)))
        return self.norm(cls_tokens)


class _TimmVisformerRoot(BKLayer):
    """Visformer: a [1, C, H, W] position embedding added after each stage's patch embedding."""

    def forward_features(self, x):
        if self._bk_bypassed():
            return super().forward_features(x)
        if self.stem is not None:
            x = self.stem(x)
        stages = [(self.patch_embed1, self.pos_embed1, self.stage1), (self.patch_embed2, self.pos_embed2, self.stage2),
                  (self.patch_embed3, self.pos_embed3, self.stage3)]
        for patch_embed, pos_embed, stage in stages:
            if patch_embed is not None:
                x = patch_embed(x)
                if pos_embed is not None:
                    x = self.pos_drop(positions(self, x, pos_embed))
            x = _timm_blocks(self, stage, x)
        return self.norm(x)


class _TimmVoloRoot(BKLayer):
    """VOLO: pos_embed [1, H, W, C] added after the outlooker stage (forward_tokens), the class
    token prepended for the class-attention blocks (forward_cls)."""

    def forward_tokens(self, x):
        if self._bk_bypassed():
            return super().forward_tokens(x)
        for idx, block in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:
                x = self.pos_drop(positions(self, x, self.pos_embed))
            x = _timm_block(self, block, x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward_cls(self, x):
        if self._bk_bypassed():
            return super().forward_cls(x)
        return _class_attention(self, x, self.cls_token, self.post_network)


class _TimmCrossVitRoot(BKLayer):
    """CrossViT: each branch's class token and positions (cls_token_i, pos_embed_i) in _embed."""

    def _embed(self, x):
        if self._bk_bypassed():
            return super()._embed(x)
        from timm.models.crossvit import scale_image

        xs = []
        for i, patch_embed in enumerate(self.patch_embed):
            x_ = patch_embed(scale_image(x, self.img_size_scaled[i], self.crop_scale))
            token, pos_embed = (self.cls_token_0, self.pos_embed_0) if i == 0 else (self.cls_token_1, self.pos_embed_1)
            x_ = _with_class_tokens(self, x_, token)
            xs.append(self.pos_drop(positions(self, x_, pos_embed)))
        return xs


def _gamma(layer, x, gamma):
    """gamma * x for XCiT's layer scales, which are the float 1.0 when eta is None."""
    return scale(layer, x, gamma, -1) if isinstance(gamma, torch.Tensor) else gamma * x


class _TimmXcitRoot(BKLayer):
    def forward_cls(self, x):
        if self._bk_bypassed():
            return super().forward_cls(x)
        return _class_attention(self, x, self.cls_token, self.cls_attn_blocks)


class _TimmXca(BKLayer):
    """XCA, cross-covariance attention: its per-head temperature [H, 1, 1] through bk.nn.scale."""

    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q = scale(self, torch.nn.functional.normalize(q, dim=-1), self.temperature, 1)
        k = torch.nn.functional.normalize(k, dim=-1)
        if self.fused_attn:
            x = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            x = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C)))


class _TimmXcaBlock(BKLayer):
    def forward(self, x, H, W):
        if self._bk_bypassed():
            return super().forward(x, H, W)
        x = x + self.drop_path1(_gamma(self, self.attn(self.norm1(x)), self.gamma1))
        x = x + self.drop_path3(_gamma(self, self.local_mp(self.norm3(x), H, W), self.gamma3))
        return x + self.drop_path2(_gamma(self, self.mlp(self.norm2(x)), self.gamma2))


class _TimmXcitClassBlock(BKLayer):
    def forward(self, x):
        if self._bk_bypassed():
            return super().forward(x)
        x_norm1 = self.norm1(x)
        x = x + self.drop_path1(_gamma(self, torch.cat([self.attn(x_norm1), x_norm1[:, 1:]], dim=1), self.gamma1))
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
        cls_token = _gamma(self, self.mlp(x[:, 0:1]), self.gamma2)
        return x + self.drop_path2(torch.cat([cls_token, x[:, 1:]], dim=1))


class _TimmXcitPositions(BKLayer):
    """XCiT's PositionalEncodingFourier: timm projects ONE grid of Fourier features with its 1x1
    token_projection and repeats the result for the batch. bk's Conv2d expands a batch-1 input
    to the batch, so the repeat then made B x B rows; here the grid is expanded to the B
    examples first (each projection is example b's, its gradient b's alone)."""

    _bk_swap_without_parameters = True

    def forward(self, B, H, W):
        # Frozen or not: under an engine bk's Conv2d expands a batch-1 input whenever it is called.
        if in_plain_forward() or self._bk_layout() is None:
            return super().forward(B, H, W)
        device, dtype = self.token_projection.weight.device, self.token_projection.weight.dtype
        # from here on timm's forward (timm 1.0), but for the expand before the projection
        y_embed = torch.arange(1, H + 1, device=device).to(torch.float32).unsqueeze(1).repeat(1, 1, W)
        x_embed = torch.arange(1, W + 1, device=device).to(torch.float32).repeat(1, H, 1)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, device=device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack([pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos_y = torch.stack([pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(dtype).expand(B, -1, -1, -1))


class _TimmConvitRoot(BKLayer):
    def forward_features(self, x):
        if self._bk_bypassed():
            return super().forward_features(x)
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = positions(self, x, self.pos_embed)
        x = self.pos_drop(x)
        for u, blk in enumerate(self.blocks):
            if u == self.local_up_to_layer and self.cls_token is not None:
                x = _with_class_tokens(self, x, self.cls_token)
            x = blk(x)
        return self.norm(x)


class _TimmCoatRoot(BKLayer):
    """CoaT: each of the four stages prepends its own class token (cls_token1..4, timm's
    module-level insert_cls) to its patch embeddings; the parallel blocks of CoaT (not Lite)
    follow. timm's forward_features (timm 1.0) for classification, the tokens through shifts."""

    def forward_features(self, x0):
        if self._bk_bypassed() or (not torch.jit.is_scripting() and self.return_interm_layers):
            return super().forward_features(x0)
        B, x, xs, sizes = x0.shape[0], x0, [], []
        for i in range(1, 5):
            patch_embed = getattr(self, f"patch_embed{i}")
            if patch_embed is None:  # a pruned model ends at the stage before
                return xs[-1]
            x = patch_embed(x)
            H, W = patch_embed.grid_size
            x = _with_class_tokens(self, x, getattr(self, f"cls_token{i}"))
            for blk in getattr(self, f"serial_blocks{i}"):
                x = blk(x, size=(H, W))
            xs.append(x)
            sizes.append((H, W))
            x = x[:, 1:, :].reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        if self.parallel_blocks is None:
            return self.norm4(xs[3])
        x1, x2, x3, x4 = xs
        for blk in self.parallel_blocks:
            x2, x3, x4 = self.cpe2(x2, sizes[1]), self.cpe3(x3, sizes[2]), self.cpe4(x4, sizes[3])
            x1, x2, x3, x4 = blk(x1, x2, x3, x4, sizes=sizes)
        return [self.norm2(x2), self.norm3(x3), self.norm4(x4)]


class _GateFn(torch.autograd.Function):
    """ConViT's gated attention (1 - s) * patch + s * pos, s = sigmoid(gating) per head; example
    b's gradient of gating_h is s_h (1 - s_h) sum_ij G_bhij (pos - patch)_bhij."""

    @staticmethod
    def forward(ctx, patch, pos, gating, layer):
        s = torch.sigmoid(gating).view(1, -1, 1, 1)
        ctx.save_for_backward(patch, pos, s)
        ctx.gating, ctx.layer = gating, layer
        return (1. - s) * patch + s * pos

    @staticmethod
    def backward(ctx, g):
        patch, pos, s = ctx.saved_tensors
        acc = accumulation_dtype(g.dtype)
        per_example = (g * (pos - patch)).to(acc).sum((2, 3)) * (s * (1. - s)).view(1, -1).to(acc)
        grads = (g * (1. - s), g * s)
        if ctx.layer._bk_hand_off([(ctx.gating, DenseUse(per_example))]):
            return *grads, None, None
        return *grads, per_example.sum(0).to(ctx.gating.dtype), None


class _TimmGpsa(BKLayer):
    """ConViT's GPSA: timm's get_attention with the gating through _GateFn (qk, v, proj and
    pos_proj are bk Linears; pos_proj reads the relative indices expanded to the batch)."""

    def get_attention(self, x):
        if self._bk_bypassed():
            return super().get_attention(x)
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        pos_score = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        patch_score = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        attn = _GateFn.apply(patch_score, pos_score, self.gating_param, self)
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        return self.attn_drop(attn)


def _in(timm_module, *names):
    """The registration's match: classes of these names in timm.models.<timm_module>."""
    return lambda cls: cls.__module__ == f"timm.models.{timm_module}" and cls.__name__ in names


def _timm_cait_class(module):
    name = type(module).__name__
    if name == "Cait":
        fits = _takes(type(module), "forward_features", ["x"]) and _own(module) <= {"cls_token", "pos_embed"} and \
            all(hasattr(module, a) for a in ("patch_embed", "pos_drop", "blocks", "blocks_token_only", "norm"))
        return mixin_class(type(module), _TimmCaitRoot) if fits else GENERIC
    fits = _own(module) <= {"gamma_1", "gamma_2"} and all(hasattr(module, a) for a in ("gamma_1", "gamma_2", "drop_path"))
    if name == "LayerScaleBlock" and fits and _takes(type(module), "forward", ["x"]):
        return mixin_class(type(module), _TimmCaitBlock)
    if name == "LayerScaleBlockClassAttn" and fits and _takes(type(module), "forward", ["x", "x_cls"]):
        return mixin_class(type(module), _TimmCaitClassBlock)
    return GENERIC


def _timm_pit_class(module):
    fits = _takes(type(module), "forward_features", ["x"]) and _own(module) <= {"cls_token", "pos_embed"} and \
        all(hasattr(module, a) for a in ("patch_embed", "pos_drop", "transformers", "norm"))
    return mixin_class(type(module), _TimmPitRoot) if fits else GENERIC


register_layer(None, _timm_cait_class, matches=_in("cait", "Cait", "LayerScaleBlock", "LayerScaleBlockClassAttn"))
register_layer(None, _timm_pit_class, matches=_in("pit", "PoolingVisionTransformer"))


def _timm_visformer_class(module):
    fits = _takes(type(module), "forward_features", ["x"]) and \
        _own(module) <= {"pos_embed1", "pos_embed2", "pos_embed3"} and \
        all(hasattr(module, a) for a in ("stem", "patch_embed1", "patch_embed2", "patch_embed3", "pos_drop", "norm"))
    return mixin_class(type(module), _TimmVisformerRoot) if fits else GENERIC


def _timm_volo_class(module):
    fits = _takes(type(module), "forward_tokens", ["x"]) and _takes(type(module), "forward_cls", ["x"]) and \
        _own(module) <= {"pos_embed", "cls_token"} and \
        all(hasattr(module, a) for a in ("network", "post_network", "pos_drop"))
    return mixin_class(type(module), _TimmVoloRoot) if fits else GENERIC


register_layer(None, _timm_visformer_class, matches=_in("visformer", "Visformer"))
register_layer(None, _timm_volo_class, matches=_in("volo", "VOLO"))


def _timm_crossvit_class(module):
    fits = _takes(type(module), "_embed", ["x"]) and len(module.patch_embed) == 2 and \
        _own(module) <= {"cls_token_0", "cls_token_1", "pos_embed_0", "pos_embed_1"} and \
        all(hasattr(module, a) for a in ("img_size_scaled", "crop_scale", "pos_drop"))
    return mixin_class(type(module), _TimmCrossVitRoot) if fits else GENERIC


_XCIT = {  # class name: (bk mixin, the forward's arguments, the own Parameters it book-keeps)
    "Xcit": (_TimmXcitRoot, ("forward_cls", ["x"]), {"cls_token"}),
    "XCA": (_TimmXca, ("forward", ["x"]), {"temperature"}),
    "XCABlock": (_TimmXcaBlock, ("forward", ["x", "H", "W"]), {"gamma1", "gamma2", "gamma3"}),
    "ClassAttentionBlock": (_TimmXcitClassBlock, ("forward", ["x"]), {"gamma1", "gamma2"}),
    "PositionalEncodingFourier": (_TimmXcitPositions, ("forward", ["B", "H", "W"]), set()),
}


def _timm_xcit_class(module):
    mixin, (method, args), params = _XCIT[type(module).__name__]
    fits = _takes(type(module), method, args) and _own(module) <= params
    return mixin_class(type(module), mixin) if fits else GENERIC


register_layer(None, _timm_crossvit_class, matches=_in("crossvit", "CrossVit"))
register_layer(None, _timm_xcit_class, matches=_in("xcit", *_XCIT))


def _timm_convit_class(module):
    if type(module).__name__ == "GPSA":
        fits = _takes(type(module), "get_attention", ["x"]) and _own(module) <= {"gating_param"} and \
            all(hasattr(module, a) for a in ("qk", "pos_proj", "rel_indices", "scale", "attn_drop"))
        return mixin_class(type(module), _TimmGpsa) if fits else GENERIC
    fits = _takes(type(module), "forward_features", ["x"]) and _own(module) <= {"cls_token", "pos_embed"} and \
        all(hasattr(module, a) for a in ("patch_embed", "use_pos_embed", "pos_drop", "blocks", "local_up_to_layer"))
    return mixin_class(type(module), _TimmConvitRoot) if fits else GENERIC


register_layer(None, _timm_convit_class, matches=_in("convit", "ConVit", "GPSA"))


def _timm_coat_class(module):
    stages = ("patch_embed", "cls_token", "serial_blocks")
    fits = _takes(type(module), "forward_features", ["x0"]) and \
        _own(module) <= {f"cls_token{i}" for i in range(1, 5)} and \
        all(hasattr(module, f"{a}{i}") for a in stages for i in range(1, 5)) and \
        all(hasattr(module, a) for a in ("parallel_blocks", "return_interm_layers", "norm4"))
    return mixin_class(type(module), _TimmCoatRoot) if fits else GENERIC


register_layer(None, _timm_coat_class, matches=_in("coat", "CoaT"))
