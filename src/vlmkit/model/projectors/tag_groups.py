"""Tag-group projector: a cell's features, plus one token per group of words the tower scores there.

For towers trained by vlmkit's vision stage (`train.stage: vision`), which scores every
output token against the words of the captions (`vlmkit/train/vision_tags.py`). Each f x f
block of patches is a cell. With `features: true` a cell's first token is what the
`pixel_shuffle` projector makes of it (its folded features, a LayerNorm, a learned position,
a linear map). Then, for each group of words (say the shape words), the tower's frozen tag
head scores every patch for those words, the scores are pooled over the cell by log-sum-exp
(as the head was trained to pool them), and a linear map of the group's scores alone, plus a
learned cell and group embedding, is one more token. Tokens come cell by cell.

Why: a token that holds both an object's colour and its shape lets the LM read one as
evidence for the other. Trained on scenes that never show a blue circle, the from-scratch
shapes model (`make demo-scratch`) learnt that no blue object is a circle, and left the
compositional split's blue circles uncounted (count 0.49-0.65, with the cells' features and
with all their word scores in one token alike). A token of shape scores alone carries no
colour to learn that from: beside the features it lifted the held-out count (0.66-0.96 over
ten runs) and compositional accuracy (9-10 points on matched seeds), but in six of those runs
the model swapped the two columns of a row ("top left" for "top right"; test position
0.79-0.93), giving the corner of the row's other object, and no position code for the shape
token stopped that, so the shapes example keeps `pixel_shuffle`. No shipped config uses this
projector; the runs are in the git history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.model.projectors.base import Grid, GridPositions, Projector, crop_grids, map_crops, pad_crops
from vlmkit.model.projectors.pixel_shuffle import PixelShuffleProjector, pixel_shuffle, shuffle_factor, shuffled_grid

HEAD_FILE = "tag_head.safetensors"  # written by the vision stage beside its tower, with TAGS_FILE
TAGS_FILE = "tags.json"
# The head file's metadata: which features of the tower its scores are for.
HEAD_FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def group_indices(args: dict) -> list[list[int]]:
    """Indices into `args["tags"]` of the words of each of `args["groups"]`, checked."""
    tags, groups = args.get("tags"), args.get("groups")
    if not tags or not groups:
        raise ConfigError("the tag_groups projector needs projector_args.groups (lists of tag words) and a tower "
                          f"from the vision stage (model.vision, with its {TAGS_FILE} and {HEAD_FILE})")
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(group, (list, tuple)) and all(isinstance(word, str) for word in group) for group in groups):
        raise ConfigError(f"projector_args.groups must be a list of lists of words, e.g. [[circle, square], "
                          f"[red, blue]], not {groups!r}")
    if not isinstance(args.get("features", False), bool):
        raise ConfigError(f"projector_args.features must be true or false, not {args['features']!r}")
    index = {tag: i for i, tag in enumerate(tags)}
    missing = sorted({word for group in groups for word in group if word not in index})
    if missing:
        raise ConfigError(f"projector_args.groups: {', '.join(missing)} not among the tower's tags; "
                          f"check the spelling against its {TAGS_FILE}")
    chosen = [[index[word] for word in group] for group in groups]
    if any(not group for group in chosen):
        raise ConfigError("projector_args.groups: a group is empty; give each group one word or more")
    return chosen


def tokens_per_cell(args: dict) -> int:
    """The features' token (with `features: true`), then one per group."""
    return len(group_indices(args)) + bool(args.get("features", False))


class TagGroupProjector(Projector):
    """Per `factor` x `factor` cell: its features' token (with `features: true`), then one per word group.

    Args: `tags` (the tower's tag words, in its head's order; the model builder fills them in
    from the tower's directory), `groups` (lists of those words), `features`, `factor`.
    """

    ARGS = frozenset({"factor", "tags", "groups", "features"})

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__()
        self.prefix, self.factor = prefix, shuffle_factor(args)
        self.groups = group_indices(args)
        self.features = None
        if args.get("features", False):
            self.features = PixelShuffleProjector(vision_dim, text_dim, {"factor": self.factor, "pos_embed": True},
                                                  grid, prefix)
        # The vision stage's scorer: buffers, not parameters, so that no optimizer ever trains it
        # (a loaded checkpoint's parameters come back trainable). The model builder loads it.
        head = nn.Linear(vision_dim, len(args["tags"]))
        self.register_buffer("head_weight", head.weight.detach().clone())
        self.register_buffer("head_bias", head.bias.detach().clone())
        self.proj = nn.ModuleList(nn.Linear(len(group), text_dim) for group in self.groups)
        # Added after the projection, at unit scale: the projected scores are of about that size,
        # and with embeddings started at 0.02 the model placed objects worse (position 0.81 against
        # 0.99). One position per cell, shared by its group tokens (resized for other grids).
        self.group_embedding = nn.Parameter(torch.randn(len(self.groups), text_dim))
        self.positions = GridPositions(shuffled_grid(grid, self.factor), 0, text_dim, True)

    grid_multiple = PixelShuffleProjector.grid_multiple  # cells are the pixel shuffle's blocks

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        return PixelShuffleProjector.output_tokens(grid, prefix, args) * tokens_per_cell(args)

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        """Tokens are sums of the group maps, group embeddings and positions: all of them scale."""
        for proj in self.proj:
            proj.weight.mul_(factor)
            proj.bias.mul_(factor)
        self.group_embedding.mul_(factor)
        self.positions.embedding.mul_(factor)
        if self.features is not None:
            self.features.scale_output_(factor)

    def load_head(self, state: dict[str, torch.Tensor], source: str = HEAD_FILE) -> None:
        """Copy in the vision stage's tag head (its `weight` and `bias`, as saved in HEAD_FILE)."""
        shapes = {"weight": tuple(self.head_weight.shape), "bias": tuple(self.head_bias.shape)}
        got = {key: tuple(value.shape) for key, value in state.items()}
        if got != shapes:
            raise ConfigError(f"{source} holds {got}, but this tower and its tags need {shapes}; the head and the "
                              f"tower come from different runs: re-run the vision stage")
        with torch.no_grad():
            self.head_weight.copy_(state["weight"])
            self.head_bias.copy_(state["bias"])

    def cell_scores(self, patches: torch.Tensor, grid: Grid) -> torch.Tensor:
        """(crops, h*w, vision_dim) patches -> (crops, cells, tags), pooled as the head was trained."""
        f = self.factor
        scores = pixel_shuffle(F.linear(patches, self.head_weight, self.head_bias), grid, f)  # a cell's patches side by side
        return torch.logsumexp(scores.reshape(*scores.shape[:2], f * f, -1), dim=2)

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        out_grids = [shuffled_grid(grid, self.factor) for grid in grids]
        cells = map_crops(self.cell_scores, features[:, self.prefix :], grids)
        tokens = torch.stack([proj(cells[..., group]) for proj, group in zip(self.proj, self.groups)], dim=2)
        positions = pad_crops([self.positions.table(grid) for grid in out_grids])[:, : tokens.shape[1]]
        tokens = tokens + self.group_embedding + positions[:, :, None]
        if self.features is not None:
            tokens = torch.cat([self.features(features, grids)[:, :, None], tokens], dim=2)
        return tokens.flatten(1, 2)  # cell by cell; padding cells last
