"""Models and training-step methods for the whole-step benchmarks.

A workload is a model plus one fixed batch: `inputs` (tensors with the examples on dim 0),
`targets`, and `forward(model, *inputs) -> logits` ([B, C] or [B, L, C]). Every method trains
with the same loss: cross entropy, averaged over an example's tokens and then over the batch,
so the per-example loss is the mean over that example's tokens.

Methods (all private ones: Abadi clipping of the whole gradient (all-layer) to norm R, Gaussian
noise of std sigma*R on the sum, divided by B, then plain SGD):
- "non-private": stock autograd.
- "vmap": per-example gradients with torch.func (vmap(grad) over functional_call), clip, sum,
  noise: the naive per-example baseline.
- "opacus hooks": Opacus GradSampleModule (grad_sample_mode="hooks") + DPOptimizer.
- "opacus ghost": Opacus ghost clipping (grad_sample_mode="ghost": two backward passes, the
  criterion wrapped in DPLossFastGradientClipping).
- "bk (<backend>)": bk.convert + bk.PrivacyEngine.
A method that cannot run a model raises Unsupported with the reason.
"""
import copy

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIGMA, R, LR = 1.0, 1.0, 1e-3


class Unsupported(Exception):
    """This method cannot train this model; the message says why."""


class Workload:
    def __init__(self, name, model, inputs, targets, forward, shape):
        self.name, self.model, self.inputs, self.targets, self.forward = name, model, inputs, targets, forward
        self.shape = shape  # dict of the sizes, for the result rows
        self.B = targets.shape[0]

    def loss(self, model):
        """The batch loss: mean over examples of each example's mean token loss."""
        out = self.forward(model, *self.inputs)
        return F.cross_entropy(out.flatten(0, -2), self.targets.flatten())

    def to(self, device, dtype):
        self.model.to(device=device, dtype=dtype)
        self.inputs = tuple(x.to(device=device, dtype=dtype if x.is_floating_point() else None) for x in self.inputs)
        self.targets = self.targets.to(device)
        return self


# ---------------------------------------------------------------- models

def mlp(B=256, width=512, depth=3, classes=10, d_in=784):
    torch.manual_seed(0)
    layers = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, classes))
    x, y = torch.randn(B, d_in), torch.randint(0, classes, (B,))
    return Workload("mlp", model, (x,), y, lambda m, x: m(x),
                    dict(model="mlp", layers=depth, width=width, T=1, B=B))


def cnn(B=64, width=32, classes=10, size=32):
    """A CIFAR-like conv net: three 3x3 conv + GroupNorm + ReLU stages, pooling, a linear head."""
    torch.manual_seed(0)
    w = width

    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU()]

    model = nn.Sequential(*stage(3, w), nn.AvgPool2d(2), *stage(w, 2 * w), nn.AvgPool2d(2),
                          *stage(2 * w, 2 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes))
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload("cnn", model, (x,), y, lambda m, x: m(x),
                    dict(model="cnn", layers=3, width=width, T=size * size, B=B))


def gpt2(B=8, T=128, layers=4, width=256, vocab=50257):
    """Hugging Face GPT-2 (its Conv1D layers, tied embedding and LM head), next-token loss."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=max(T, 128), n_embd=width, n_layer=layers,
                                     n_head=max(1, width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (B, T + 1))
    positions = torch.arange(T).expand(B, -1).contiguous()  # one row per example: bk needs [B, T]

    def forward(m, ids, positions):
        return m(input_ids=ids, position_ids=positions).logits

    return Workload("gpt2", model, (ids[:, :-1].contiguous(), positions), ids[:, 1:].contiguous(), forward,
                    dict(model="gpt2", layers=layers, width=width, T=T, B=B))


def _causal_lm(name, model, B, T, vocab, layers, width, label=None):
    """A transformers causal LM called with ids alone, next-token targets; ids drawn after the model."""
    ids = torch.randint(0, vocab, (B, T + 1))

    def forward(m, ids):
        return m(input_ids=ids).logits

    return Workload(name, model, (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous(), forward,
                    dict(model=label or name, layers=layers, width=width, T=T, B=B))


def llama(B=8, T=128, layers=4, width=256, vocab=32000, lora=False):
    """Hugging Face Llama called as its users call it (no position_ids), full fine-tuning or
    PEFT LoRA (r=8 on q_proj and v_proj). Its LlamaRMSNorm layers go through bk.nn.scale (nn/hf_rmsnorm.py)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                                      num_key_value_heads=max(1, width // 128), max_position_embeddings=max(T, 128))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0))
    return _causal_lm("llama", model, B, T, vocab, layers, width, "llama-lora" if lora else "llama")


def mixtral(B=8, T=128, layers=4, width=256, experts=8, top_k=2, vocab=32000):
    """Hugging Face Mixtral (sparse MoE: top-2 of 8 experts per token), full fine-tuning. Its
    experts take bk's MoE path (per (expert, example) ghost/direct norms); the routers take the
    generic path."""
    import transformers

    config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 2,
                                        num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                                        num_key_value_heads=max(1, width // 128), num_local_experts=experts,
                                        num_experts_per_tok=top_k, max_position_embeddings=max(T, 128),
                                        router_jitter_noise=0.0, experts_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    return _causal_lm("mixtral", model, B, T, vocab, layers, width)


def mamba2(B=8, T=128, layers=4, width=256, state=64, head_dim=64, chunk=64, vocab=8192):
    """Hugging Face Mamba-2 (its mixers on bk's fused path: nn/mamba.py; its RMSNorms and gated
    RMSNorms through bk.nn.scale: nn/hf_rmsnorm.py), full fine-tuning, transformers' torch chunked scan."""
    import transformers

    config = transformers.Mamba2Config(vocab_size=vocab, hidden_size=width, state_size=state, num_hidden_layers=layers,
                                       expand=2, head_dim=head_dim, num_heads=2 * width // head_dim, n_groups=1,
                                       chunk_size=chunk, use_cache=False)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(config)
    return _causal_lm("mamba2", model, B, T, vocab, layers, width)


def timm_vit(B=32, size=32, patch=4, width=192, layers=4, heads=3, classes=10):
    """timm's vit_tiny_patch16_224 at 32 x 32 images, 4 x 4 patches: the root model owns the cls
    token and the positions (used only in its _pos_embed, which takes the generic path); timm's
    LayerNorm subclass takes the generic path too."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=patch,
                              embed_dim=width, depth=layers, num_heads=heads, num_classes=classes)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload("timm_vit", model, (x,), y, lambda m, x: m(x),
                    dict(model="timm_vit", layers=layers, width=width, T=(size // patch) ** 2 + 1, B=B))


def _timm_staged_net(name, model, B, size, classes):
    """A timm image model with stages of blocks (ConvNeXt, ResNet-V2) at size x size."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=classes)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload(name, net, (x,), y, lambda m, x: m(x),
                    dict(model=name, layers=sum(len(s.blocks) for s in net.stages), width=net.num_features,
                         T=(size // 32) ** 2, B=B))


def timm_convnext(B=16, size=64, classes=10, model="convnext_atto"):
    """timm's ConvNeXt-atto (3.4M parameters) at 64 x 64: its blocks multiply by their gamma inline
    and its norms are LayerNorm2d (bk.nn.scale and bk's fused LayerNorm)."""
    return _timm_staged_net("timm_convnext", model, B, size, classes)


def timm_bit(B=16, size=64, classes=10, model="resnetv2_50x1_bit"):
    """timm's BiT ResNet-V2-50 (23.5M parameters) at 64 x 64: every convolution weight-standardized
    (StdConv2d), GroupNormAct norms; the DP image classifiers' backbone."""
    return _timm_staged_net("timm_bit", model, B, size, classes)


def tv_vit(B=32, size=32, patch=4, width=192, layers=4, heads=3, classes=10):
    """torchvision's VisionTransformer at timm_vit's sizes: its root owns the class token and its
    Encoder the positions, used inline (before session 15 both took the generic path, which
    recomputed the whole model per example)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=size, patch_size=patch, num_layers=layers, num_heads=heads,
                              hidden_dim=width, mlp_dim=4 * width, num_classes=classes)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload("tv_vit", model, (x,), y, lambda m, x: m(x),
                    dict(model="tv_vit", layers=layers, width=width, T=(size // patch) ** 2 + 1, B=B))


def tv_swin(B=8, size=64, classes=10):
    """torchvision's swin_t (28M parameters) at 64 x 64: its window attention hands qkv.weight and
    proj.weight to a function (before session 15 the generic path: each attention recomputed per
    example)."""
    from torchvision.models import swin_t

    torch.manual_seed(0)
    model = swin_t(weights=None, num_classes=classes)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload("tv_swin", model, (x,), y, lambda m, x: m(x),
                    dict(model="tv_swin", layers=12, width=768, T=(size // 32) ** 2, B=B))


def tv_resnet18(B=32, size=32, classes=10, frozen_bn=False):
    """torchvision's resnet18 at CIFAR's 32 x 32 with its BatchNorms replaced by GroupNorm
    (bk.replace_batchnorm; Opacus' tutorials do the same with ModuleValidator.fix): the DP image
    classifier most users start from. frozen_bn: the BatchNorms frozen instead
    (bk.freeze_batchnorm, a pretrained network's fine-tuning; non-private runs the same model)."""
    import bk_kernels as bk
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=classes)
    model = bk.freeze_batchnorm(model) if frozen_bn else bk.replace_batchnorm(model)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    return Workload("tv_resnet18", model, (x,), y, lambda m, x: m(x),
                    dict(model="tv_resnet18", layers=21, width=512, T=(size // 32) ** 2, B=B))


class ViTBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """A small ViT from stock layers: conv patch embedding, learned positions (an Embedding fed
    [B, N] position ids), pre-norm blocks of nn.MultiheadAttention and an MLP, mean pooling."""

    def __init__(self, size=32, patch=4, width=192, layers=4, heads=3, classes=10):
        super().__init__()
        self.patches = (size // patch) ** 2
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        self.pos = nn.Embedding(self.patches, width)
        self.blocks = nn.Sequential(*(ViTBlock(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x, positions):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos(positions)
        return self.head(self.norm(self.blocks(x)).mean(1))


def vit(B=32, size=32, patch=4, width=192, layers=4, heads=3, classes=10):
    torch.manual_seed(0)
    model = ViT(size, patch, width, layers, heads, classes)
    x, y = torch.randn(B, 3, size, size), torch.randint(0, classes, (B,))
    positions = torch.arange(model.patches).expand(B, -1).contiguous()
    return Workload("vit", model, (x, positions), y, lambda m, x, pos: m(x, pos),
                    dict(model="vit", layers=layers, width=width, T=model.patches, B=B))


MODELS = {"mlp": mlp, "cnn": cnn, "gpt2": gpt2, "vit": vit, "llama": llama, "mixtral": mixtral, "mamba2": mamba2,
          "timm_vit": timm_vit,
          "timm_convnext": timm_convnext, "timm_bit": timm_bit, "tv_vit": tv_vit, "tv_swin": tv_swin,
          "tv_resnet18": tv_resnet18}


# ---------------------------------------------------------------- methods

def _own(w, fresh):
    return copy.deepcopy(w.model) if fresh else w.model


def _non_private(w, sigma, seed, fresh, check):
    model = _own(w, fresh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad()
        w.loss(model).backward()
        opt.step()

    return model, step


def _vmap(w, sigma, seed, fresh, check):
    """torch.func per-example gradients of every trainable parameter, then clip, sum, noise."""
    from torch.func import functional_call, grad, vmap

    model = _own(w, fresh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    gen = torch.Generator(device=w.targets.device).manual_seed(seed)

    def example_loss(p, *example):
        *inputs, target = (t.unsqueeze(0) for t in example)
        out = w.forward(lambda *a, **k: functional_call(model, ({**params, **p}, buffers), a, k), *inputs)
        return F.cross_entropy(out.flatten(0, -2), target.flatten())

    per_example = vmap(grad(example_loss), in_dims=(None,) + (0,) * (len(w.inputs) + 1))

    def step():
        opt.zero_grad()
        trainable = {n: params[n].detach() for n in names}
        grads = per_example(trainable, *w.inputs, w.targets)
        sq = sum(g.flatten(1).square().sum(1, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
                 for g in grads.values())
        c = (R / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for n in names:
            g = grads[n]
            total = torch.einsum("b,b...->...", c.to(g.dtype), g)
            if sigma:
                total.add_(torch.randn(total.shape, generator=gen, device=g.device, dtype=g.dtype), alpha=sigma * R)
            params[n].grad = total / w.B
        opt.step()

    if not check:
        return model, step
    try:
        with torch.no_grad():
            per_example({n: params[n].detach() for n in names}, *(x[:1] for x in w.inputs), w.targets[:1])
    except Exception as err:  # e.g. data-dependent control flow inside the model
        raise Unsupported(f"torch.func cannot vmap this model: {type(err).__name__}: {str(err).splitlines()[0]}")
    return model, step


def _opacus(w, sigma, seed, mode, fresh, check):
    try:
        import opacus
        from opacus.validators import ModuleValidator
    except ImportError:
        raise Unsupported("opacus is not installed")
    import warnings

    model = _own(w, fresh)
    if not ModuleValidator.is_valid(model):
        # Opacus' own route: e.g. nn.MultiheadAttention -> DPMultiheadAttention (same math, Linear layers).
        try:
            p0 = next(model.parameters())
            model = ModuleValidator.fix(model).to(device=p0.device, dtype=p0.dtype)  # keeps the weights
        except Exception as err:
            raise Unsupported(f"Opacus ModuleValidator: {str(err).splitlines()[0]}")
        if not ModuleValidator.is_valid(model):
            errors = ModuleValidator.validate(model, strict=False)
            raise Unsupported(f"Opacus ModuleValidator: {str(errors[0]).splitlines()[0]}")
    note = ""
    if mode == "ghost" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # Opacus ghost clipping refuses tied weights ("Parameter tying is not supported"): it
        # trains a copy whose LM head has its own weight (same values; one more [V, d] matrix).
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        note = "lm_head untied: Opacus ghost does not support tied weights"
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dataset = torch.utils.data.TensorDataset(*w.inputs, w.targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=w.B)
    engine = opacus.PrivacyEngine(accountant="rdp")
    gen = torch.Generator(device=w.targets.device).manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(module=model, optimizer=opt, criterion=criterion, data_loader=loader,
                                       noise_multiplier=sigma, max_grad_norm=R, poisson_sampling=False,
                                       grad_sample_mode=mode, noise_generator=gen)
    except Exception as err:
        raise Unsupported(f"Opacus make_private: {type(err).__name__}: {str(err).splitlines()[0]}")
    if mode == "ghost":
        gsm, dp_opt, dp_criterion, _ = made

        def step():
            dp_opt.zero_grad()
            out = w.forward(gsm, *w.inputs)
            shape = out.shape if out.dim() == 3 else None
            dp_criterion(out.flatten(0, -2), w.targets.flatten(), shape=shape).backward()
            dp_opt.step()
    else:
        gsm, dp_opt, _ = made

        def step():
            dp_opt.zero_grad()
            w.loss(gsm).backward()
            dp_opt.step()

    step.note = note
    if not check:
        return gsm, step
    try:
        # One trial step on a copy of the state: an unsupported layer fails here, not mid-benchmark.
        state = copy.deepcopy(gsm.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()
        gsm.load_state_dict(state)
    except Exception as err:
        raise Unsupported(f"Opacus {mode} step: {type(err).__name__}: {str(err).splitlines()[0]}")
    return gsm, step


def _bk(w, sigma, seed, backend, fresh, check):
    import bk_kernels as bk

    model = _own(w, fresh)
    try:
        bk.convert(model)
        engine = bk.PrivacyEngine(model, batch_size=w.B, sample_size=100 * w.B, noise_multiplier=sigma,
                                  max_grad_norm=R, clipping_fn="abadi", clipping_style="all-layer",
                                  backend=backend, seed=seed)
    except Exception as err:
        raise Unsupported(f"bk: {type(err).__name__}: {str(err).splitlines()[0]}")
    opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR))
    _time_generic_path()

    def step():
        opt.zero_grad()
        w.loss(model).backward()
        opt.step()

    step.generic = bk.generic_modules(model)
    return model, step


# Seconds spent in the generic path's per-example recompute (nn/generic.py), for the share of the
# step it takes: models.run resets it after the warm-up and reads it after the timed rounds.
GENERIC_SECONDS = [0.0]


def _time_generic_path():
    from bk_kernels.nn.generic import GenericLayer

    if getattr(GenericLayer._bk_per_example_grads, "_timed", False):
        return
    inner = GenericLayer._bk_per_example_grads

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return inner(self, *args)
        finally:
            GENERIC_SECONDS[0] += time.perf_counter() - start

    timed._timed = True
    GenericLayer._bk_per_example_grads = timed


def method_names(device):
    """Every method for this device: the baselines, then bk on each compiled backend."""
    from bk_kernels import ops

    names = ["non-private", "vmap", "opacus hooks", "opacus ghost"]
    for backend in ops.available_backends(device):
        if backend == "torch" or (backend == "triton" and device.type == "cpu"):
            continue  # torch: the slow reference; Triton's CPU interpreter is for tests, not timing
        names.append(f"bk ({backend})")
    return names


def make_step(w, method, sigma=SIGMA, seed=0, fresh=True, check=True):
    """(the trained module, a function taking one training step); raises Unsupported.

    fresh: train a copy of w.model (else w.model itself); check: try the step once first
    (on a copy of the state), so that an unsupported model fails here rather than mid-run."""
    if method == "non-private":
        return _non_private(w, sigma, seed, fresh, check)
    if method == "vmap":
        return _vmap(w, sigma, seed, fresh, check)
    if method.startswith("opacus "):
        return _opacus(w, sigma, seed, method.split()[1], fresh, check)
    if method.startswith("bk ("):
        return _bk(w, sigma, seed, method[4:-1], fresh, check)
    raise ValueError(f"unknown method {method!r}")


def build(name, device=torch.device("cpu"), dtype=torch.float32, **sizes):
    return MODELS[name](**sizes).to(device, dtype)


def param_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
