"""timm models whose root owns tokens used inline (CaiT, PiT, Visformer, VOLO): the class token and the position
embedding are Parameters of the root model, used in its forward_features. Left alone, the root
took the generic path: a recompute of the WHOLE model per example (CaiT-XXS24 2.9x, PiT-Ti 2.8x
non-private on the CPU). Here forward_features is timm's (timm 1.0), with the class token made
per example by a shift of zeros and the positions added by a shift, as BEiT's root in
attention.py. CaiT's blocks' inline gamma_1 / gamma_2 go through bk.nn.scale.

A root whose forward_features or own Parameters differ from what is read here keeps the generic
path (exact, slow)."""
import torch

from ._core import BKLayer, in_plain_forward
from ._made import mixin_class
from .attention import _takes
from .families import GENERIC, register_layer
from .layer_scale import scale, shift


def _class_tokens(layer, x, token):
    """token [1, k, C] repeated for each example of x, as a shift of zeros (per-example grads)."""
    return shift(layer, x.new_zeros(x.shape[0], *token.shape[1:]), token, (1, *token.shape[1:]))


def _positions(layer, x, pos_embed):
    return shift(layer, x, pos_embed, (1, *pos_embed.shape[1:]))


class _TimmCaitRoot(BKLayer):
    def forward_features(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self._bk_trains():
            return super().forward_features(x)
        x = self.pos_drop(_positions(self, self.patch_embed(x), self.pos_embed))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.blocks_token_only is not None:
            cls_tokens = _class_tokens(self, x, self.cls_token)
            for blk in self.blocks_token_only:
                cls_tokens = blk(x, cls_tokens)
            x = torch.cat((cls_tokens, x), dim=1)
        return self.norm(x)


class _TimmCaitBlock(BKLayer):
    """LayerScaleBlock: x + gamma_1 * attn(norm1(x)), then the MLP likewise."""

    def forward(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self._bk_trains():
            return super().forward(x)
        x = x + self.drop_path(scale(self, self.attn(self.norm1(x)), self.gamma_1, -1))
        return x + self.drop_path(scale(self, self.mlp(self.norm2(x)), self.gamma_2, -1))


class _TimmCaitClassBlock(BKLayer):
    """LayerScaleBlockClassAttn: the class token attends to itself and the patches."""

    def forward(self, x, x_cls):
        if in_plain_forward() or self._bk_layout() is None or not self._bk_trains():
            return super().forward(x, x_cls)
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.drop_path(scale(self, self.attn(self.norm1(u)), self.gamma_1, -1))
        return x_cls + self.drop_path(scale(self, self.mlp(self.norm2(x_cls)), self.gamma_2, -1))


class _TimmPitRoot(BKLayer):
    def forward_features(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self._bk_trains():
            return super().forward_features(x)
        x = self.pos_drop(_positions(self, self.patch_embed(x), self.pos_embed))
        x, cls_tokens = self.transformers((x, _class_tokens(self, x, self.cls_token)))
        return self.norm(cls_tokens)


class _TimmVisformerRoot(BKLayer):
    """Visformer: a [1, C, H, W] position embedding added after each stage's patch embedding."""

    def forward_features(self, x):
        if in_plain_forward() or self._bk_layout() is None or not self._bk_trains():
            return super().forward_features(x)
        if self.stem is not None:
            x = self.stem(x)
        stages = [(self.patch_embed1, self.pos_embed1, self.stage1), (self.patch_embed2, self.pos_embed2, self.stage2),
                  (self.patch_embed3, self.pos_embed3, self.stage3)]
        for patch_embed, pos_embed, stage in stages:
            if patch_embed is not None:
                x = patch_embed(x)
                if pos_embed is not None:
                    x = self.pos_drop(_positions(self, x, pos_embed))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                from timm.models._manipulate import checkpoint_seq

                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.norm(x)


class _TimmVoloRoot(BKLayer):
    """VOLO: pos_embed [1, H, W, C] added after the outlooker stage (forward_tokens), the class
    token prepended for the class-attention blocks (forward_cls)."""

    def _bk_plain(self):
        return in_plain_forward() or self._bk_layout() is None or not self._bk_trains()

    def forward_tokens(self, x):
        if self._bk_plain():
            return super().forward_tokens(x)
        for idx, block in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:
                x = self.pos_drop(_positions(self, x, self.pos_embed))
            x = self._bk_checkpointed(block, x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward_cls(self, x):
        if self._bk_plain():
            return super().forward_cls(x)
        x = torch.cat([_class_tokens(self, x, self.cls_token), x], dim=1)
        for block in self.post_network:
            x = self._bk_checkpointed(block, x)
        return x

    def _bk_checkpointed(self, block, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint

            return checkpoint(block, x)
        return block(x)


def _own(module):
    return {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}


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


register_layer(None, _timm_cait_class,
               matches=lambda cls: cls.__module__ == "timm.models.cait" and
               cls.__name__ in ("Cait", "LayerScaleBlock", "LayerScaleBlockClassAttn"))
register_layer(None, _timm_pit_class,
               matches=lambda cls: cls.__module__ == "timm.models.pit" and cls.__name__ == "PoolingVisionTransformer")


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


register_layer(None, _timm_visformer_class,
               matches=lambda cls: cls.__module__ == "timm.models.visformer" and cls.__name__ == "Visformer")
register_layer(None, _timm_volo_class,
               matches=lambda cls: cls.__module__ == "timm.models.volo" and cls.__name__ == "VOLO")
