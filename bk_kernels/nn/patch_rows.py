"""Vision towers that take every image's patches as rows (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
GLM-4V).

Such a tower's input is [P, ...]: the patches of all the batch's images concatenated (each image
t x h x w patches, as `grid_thw` says), not [B, ...]. Its layers see P rows (patch embedding,
blocks) or P / m rows (the merger's m = spatial_merge_size^2 patches merged into one image token);
its attention keeps the images apart (cu_seqlens). The language model then puts merged row j at
the j-th placeholder token of the input ids in row-major order (masked_scatter), so:

    example of merged row j = the batch row of the j-th placeholder token,
    example of patch row r  = the example of merged row r // m,

and every image's rows belong to one example (checked). While the tower runs, its bk layers
read their inputs' rows through these maps instead of the model's batch size (a size other than
P or P / m is refused), and the engine sums each example's rows when it records their uses
(example_rows.RowGroups with B examples: an example without an image has none).
"""
import torch

from .. import example_rows  # (a module: it imports nn in turn)
from ..layout import UnsupportedLayoutError
from ._core import BKLayer, in_plain_forward
from ._made import mixin_class, takes
from .families import register_layer

# (module, class) of the towers: forward(hidden_states [P, ...], grid_thw [images, 3])
TOWERS = frozenset({
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionModel"),
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionModel"),
    ("transformers.models.glm4v.modeling_glm4v", "Glm4vVisionModel"),
    ("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeVisionModel"),
})


# The model inputs that feed such a tower (patch rows and their grids)
PATCH_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")


def without_empty_patches(kwargs):
    """An empty batch's keywords without its 0-row patch inputs: it has no image (its padding
    example is text only, as the tower cannot run a padded grid of zeros)."""
    return {k: v for k, v in (kwargs or {}).items()
            if not (k in PATCH_INPUTS and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 0)}


def is_tower(module):
    return (type(module).__module__, type(module).__qualname__) in TOWERS


def _refused(tower_path, why):
    return UnsupportedLayoutError(
        f"PrivacyEngine: the vision tower {tower_path} takes every image's patches as rows, and {why}: its rows "
        "cannot be matched to the examples they belong to. Freeze the tower "
        f"({tower_path}.requires_grad_(False)) to train the rest privately; nothing was recorded and no budget was "
        "spent.")


def patch_rows(tower, tower_path, args, kwargs, model_args, model_kwargs, config, batch):
    """{rows: [rows] example of each row} for one call of `tower` inside a forward of the model
    called with (model_args, model_kwargs); `config` the model's (its placeholder token ids)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
    if not isinstance(hidden, torch.Tensor) or not isinstance(grid, torch.Tensor) or grid.dim() != 2:
        raise _refused(tower_path, "it was called without its patch rows and grid_thw")
    per_image = grid.prod(-1)
    P = hidden.shape[0]
    merge = getattr(tower, "spatial_merge_size", None) or tower.config.spatial_merge_size
    m = merge * merge
    if int(per_image.sum()) != P or bool((per_image % m != 0).any()):
        raise _refused(tower_path, f"its {P} rows are not the {int(per_image.sum())} patches grid_thw gives in "
                                   f"blocks of {m}")
    ids = model_kwargs.get("input_ids", model_args[0] if model_args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != batch:
        raise _refused(tower_path, "the model was not given its input_ids as [batch, tokens] (the placeholder "
                                   "tokens say which example each image belongs to)")
    token = None
    for grid_name, token_name in (("image_grid_thw", "image_token_id"), ("video_grid_thw", "video_token_id")):
        given = model_kwargs.get(grid_name)
        if isinstance(given, torch.Tensor) and given.shape == grid.shape and torch.equal(given.to(grid.device), grid):
            token = getattr(config, token_name, None)
            break
    if token is None:
        raise _refused(tower_path, "its grid_thw is neither the model's image_grid_thw nor its video_grid_thw")
    merged = (ids == token).nonzero()[:, 0]  # the batch row of each placeholder, in row-major order
    if merged.shape[0] != P // m:
        raise _refused(tower_path, f"the input ids hold {merged.shape[0]} placeholder tokens for its {P // m} "
                                   "merged rows")
    tokens = per_image.to(merged.device) // m
    first = torch.cumsum(tokens, 0) - tokens
    image_of_token = torch.repeat_interleave(torch.arange(len(tokens), device=merged.device), tokens)
    if merged.numel() and not bool((merged == merged[first[image_of_token]]).all()):
        raise _refused(tower_path, "an image's placeholder tokens lie in more than one example")
    merged = merged.to(hidden.device)
    return {P: merged.repeat_interleave(m), P // m: merged}


class TowerRows:
    """What the engine keeps of its model's patch-rows towers: the rows of every tower call of
    the forwards not yet backpropagated, per bk layer of the tower."""

    def __init__(self, engine):
        self.engine = engine
        self.towers = []
        self.layers = {}  # id(tower) -> its bk layers
        self.noted = {}   # forward serial -> {id(layer): Rows}
        self.call = None  # the (args, kwargs) of the model's forward now running (None: none runs)

    def attach(self, model):
        """Finds the towers; returns the hooks that map their rows while they run."""
        self.towers = [m for m in model.modules() if is_tower(m)]
        self.layers = {id(t): [m for m in t.modules() if isinstance(m, BKLayer)] for t in self.towers}
        hooks = []
        for tower in self.towers:
            hooks.append(tower.register_forward_pre_hook(self._starts, with_kwargs=True))
            hooks.append(tower.register_forward_hook(self._ends, always_call=True))
        return hooks

    def model_call(self, args, kwargs):
        """The model's forward starts: what its towers will map their rows through (input_ids)."""
        if self.towers:
            self.call = (args, kwargs or {})

    def model_ends(self):
        self.call = None

    def _starts(self, tower, args, kwargs):
        """A tower's forward pre-hook: the example of each of its rows, for its layers to read
        while it runs (only when it trains, inside a forward of the model: a tower called on its
        own has no input_ids to map its rows through, and its layers refuse its rows)."""
        engine, layout = self.engine, self.engine.layout
        if self.call is None or not torch.is_grad_enabled() or layout.batch is None or engine._padding_forward or \
                not any(p.requires_grad for p in tower.parameters()):
            return
        layout.row_maps = patch_rows(tower, engine._module_path(tower), args, kwargs, *self.call,
                                     getattr(engine.model, "config", None), layout.batch)
        serial = layout.row_serial = engine._forward_serial  # the serial this forward of the model gets
        call = Rows(layout.row_maps, layout.batch)
        if serial not in self.noted:
            for old in [s for s in self.noted if s < serial - 8]:  # forwards never backpropagated
                del self.noted[old]
            self.noted[serial] = {}
        # Every bk layer of the tower reads its rows through this call's maps, also where it runs
        # again in the backward (activation checkpointing recomputes the tower's blocks)
        noted, merges = self.noted[serial], {}
        for layer in self.layers[id(tower)]:
            earlier = noted.get(id(layer))
            if earlier is not None and id(earlier) not in merges:  # the tower again: videos after images
                merges[id(earlier)] = earlier.merged(call, lambda: engine._module_path(tower))
            noted[id(layer)] = call if earlier is None else merges[id(earlier)]

    def _ends(self, tower, args, output):
        self.engine.layout.row_maps = None

    def known(self, layer, rows):
        """Whether a layer of a tower read `rows` rows in a forward not yet backpropagated: its
        recompute under activation checkpointing, in the backward."""
        return any(id(layer) in noted and rows in noted[id(layer)].maps for noted in self.noted.values())

    def rows_of(self, layer, forwards):
        """The Rows of a tower's layer in the forward this backward goes through (`forwards`: the
        serials it reached; none: the latest)."""
        forwards = forwards or [max(self.noted)]
        found = [self.noted[s][id(layer)] for s in forwards if id(layer) in self.noted.get(s, ())]
        if len(found) > 1:
            raise UnsupportedLayoutError(
                "PrivacyEngine: one backward goes through several forwards of the model that ran its vision tower on "
                "patch rows; run backward() once per forward. Nothing of this backward was kept.")
        return found[0] if found else None

    def forget(self, forwards):
        for serial in forwards:
            self.noted.pop(serial, None)


class Rows:
    """The examples of a tower's rows in one forward: {rows: example of each} over B examples;
    the RowGroups of each row count made once."""

    def __init__(self, maps, batch):
        self.maps, self.batch, self._groups = maps, batch, {}

    def merged(self, other, where):
        """The rows of two calls of the tower in one forward (images, then videos): told apart by
        their numbers of rows, which must differ."""
        clash = [n for n in other.maps if n in self.maps and not torch.equal(other.maps[n], self.maps[n])]
        if clash:
            raise UnsupportedLayoutError(
                f"PrivacyEngine: the vision tower {where()} ran twice in one forward of the model (images and videos) "
                f"with {clash[0]} rows each, so the engine cannot tell which call a row came from. Run the images and "
                "the videos in different forwards; nothing was recorded and no budget was spent.")
        return Rows({**self.maps, **other.maps}, self.batch)

    def groups(self, rows, example_groups, where):
        """The RowGroups of a use over `rows` rows: to the model's examples, or through
        engine.example_rows' groups (example_groups) when the batch's rows are not examples."""
        key = (rows, id(example_groups))
        if key not in self._groups:
            ids = self.maps.get(rows)
            if ids is None:
                raise UnsupportedLayoutError(
                    f"PrivacyEngine: {where()} recorded {rows} rows inside a vision tower whose rows were "
                    f"{' or '.join(map(str, self.maps))}; nothing of this backward was kept.")
            if example_groups is None:
                self._groups[key] = example_rows.RowGroups(ids, examples=self.batch)
            else:
                self._groups[key] = example_rows.RowGroups(example_groups.example.to(ids.device)[ids],
                                                           examples=example_groups.examples)
        return self._groups[key]


# ---------------------------------------------------------------- GLM-4V's position table


class _Glm4vPositions(BKLayer):
    """GLM-4V's Glm4vVisionEmbeddings: each patch row gets its image's learned position table
    ([S*S, d], an Embedding used inline) resampled to the image's grid by a bicubic grid_sample
    (align_corners=False, border padding), in float32. Left alone the module took the generic
    path, which cannot split a tower's patch rows per example. Here the sample is written as
    what grid_sample computes: 16 lookups of the table per row (its 4 x 4 neighbours, clamped to
    the border) weighted by the cubic convolution coefficients (A = -0.75). The lookups go
    through the bk Embedding, whose use per row the engine sums per example like the tower's
    other rows. Outside private training transformers' own forward runs."""

    _bk_swap_without_parameters = True  # the table is its child's: swapped in all the same
    sample_dtype = torch.float32  # transformers resamples in float32, whatever the model's dtype

    def forward(self, embeddings, lengths, image_shapes, h_coords, w_coords):
        table = self.position_embedding
        if in_plain_forward() or self._bk_layout() is None or not table.weight.requires_grad:
            return super().forward(embeddings, lengths, image_shapes, h_coords, w_coords)
        weight = table.weight
        side = int(weight.shape[0] ** 0.5)
        lengths = torch.as_tensor(lengths, device=embeddings.device)
        rows = torch.arange(embeddings.shape[0], device=embeddings.device)
        image = (rows.unsqueeze(0) >= lengths.cumsum(0).unsqueeze(1)).sum(0)  # transformers' arithmetic
        dtype = self.sample_dtype
        height = image_shapes[image, 1].to(embeddings.device, dtype)
        width = image_shapes[image, 2].to(embeddings.device, dtype)
        ids, coefficients = bicubic_taps(((h_coords + 0.5) / height) * 2 - 1, ((w_coords + 0.5) / width) * 2 - 1,
                                         side, dtype)
        sampled = (table(ids).to(dtype) * coefficients.unsqueeze(-1)).sum(1)
        return embeddings + sampled.to(weight.dtype).to(embeddings.device)


def bicubic_taps(y, x, side, dtype=torch.float32):
    """([P, 16] rows of a [side * side, d] table, [P, 16] weights in dtype): grid_sample's bicubic
    sample (align_corners=False, border padding) of the table viewed as a side x side image at
    the normalized points (x, y) in [-1, 1], as a weighted sum of table rows."""
    def unnormalized(t):
        return ((t.to(dtype) + 1) * side - 1) / 2

    def cubic(t):  # the weights of the taps at floor - 1 .. floor + 2 (PyTorch's A = -0.75)
        a = -0.75

        def near(d):  # |d| <= 1
            return ((a + 2) * d - (a + 3)) * d * d + 1

        def far(d):  # 1 < |d| < 2
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)

    ix, iy = unnormalized(x), unnormalized(y)
    x0, y0 = ix.floor(), iy.floor()
    steps = torch.arange(-1, 3, device=ix.device)
    xs = (x0.long().unsqueeze(1) + steps).clamp(0, side - 1)
    ys = (y0.long().unsqueeze(1) + steps).clamp(0, side - 1)
    ids = ys.unsqueeze(2) * side + xs.unsqueeze(1)  # [P, 4 (y), 4 (x)]
    weights = cubic(iy - y0).unsqueeze(2) * cubic(ix - x0).unsqueeze(1)
    return ids.flatten(1), weights.flatten(1)


def _glm4v_positions_class(module):
    if takes(type(module), "forward", ["embeddings", "lengths", "image_shapes", "h_coords", "w_coords"]) and \
            isinstance(getattr(module, "position_embedding", None), torch.nn.Embedding):
        return mixin_class(type(module), _Glm4vPositions)
    return None


register_layer(None, _glm4v_positions_class,
               matches=lambda cls: cls.__name__ in ("Glm4vVisionEmbeddings", "Glm4vMoeVisionEmbeddings")
               and cls.__module__.startswith("transformers.models."))
