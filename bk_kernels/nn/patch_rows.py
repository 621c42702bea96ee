"""Vision towers that take every image's patches as rows (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

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

from ..layout import UnsupportedLayoutError

# (module, class) of the towers: forward(hidden_states [P, ...], grid_thw [images, 3])
TOWERS = frozenset({
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionModel"),
    ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionModel"),
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
