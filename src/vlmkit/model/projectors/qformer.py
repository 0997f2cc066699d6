"""Q-Former projector (BLIP-2, MiniGPT4Qwen): learned queries read the image through a small transformer.

Each of `depth` layers lets the queries attend to each other, then to the vision features,
then runs a feed-forward block; a linear layer maps the result to the LM. The layers are
transformers' `Blip2QFormerModel`, and the names follow `Blip2ForConditionalGeneration`
(query_tokens, qformer, language_projection), so BLIP-2 Q-Former weights can be loaded
(BLIP-2 itself cross-attends every second layer: set `cross_attention_frequency: 2`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlmkit.model.projectors.base import Grid, Projector, crop_grids, valid_mask
from vlmkit.model.projectors.resampler import attention_heads, query_count


class QFormerProjector(Projector):
    """`num_queries` (default 32) learned queries through a `depth`-layer (default 2) Q-Former.

    Other args: `hidden_size` (default: the LM's width), `heads` (default one per 64
    channels), `intermediate_size` (default 4 * hidden_size), `cross_attention_frequency`
    (default 1: every layer), `dropout` (default 0). Prefix (CLS) tokens are attended to
    like the patches, as in BLIP-2; the feature select strategy decides whether any come.
    """

    ARGS = frozenset({"hidden_size", "dropout", "depth", "heads", "intermediate_size", "cross_attention_frequency",
                      "num_queries"})

    def __init__(self, vision_dim: int, text_dim: int, args: dict, grid: Grid, prefix: int):
        super().__init__()
        self.prefix = prefix
        hidden = args.get("hidden_size", text_dim)
        dropout = args.get("dropout", 0.0)
        config = Blip2QFormerConfig(
            hidden_size=hidden, num_hidden_layers=args.get("depth", 2),
            num_attention_heads=attention_heads(args, hidden, "qformer"),
            intermediate_size=args.get("intermediate_size", 4 * hidden), encoder_hidden_size=vision_dim,
            cross_attention_frequency=args.get("cross_attention_frequency", 1),
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )
        # Normal, not zero (transformers' default): identical queries would stay identical.
        self.query_tokens = nn.Parameter(torch.randn(query_count(args, 32), hidden) * config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(hidden, text_dim)

    @staticmethod
    def output_tokens(grid: Grid, prefix: int, args: dict) -> int:
        return query_count(args, 32)

    def forward(self, features, grids):
        grids = crop_grids(grids, features, self.prefix)
        lengths = [self.prefix + h * w for h, w in grids]
        rows = features[:, : max(lengths)]
        valid = valid_mask(lengths, rows.shape[1], rows.device)
        # Zeroed padding: its attention weight is 0, but 0 * NaN would still poison the sum.
        rows = rows.masked_fill(~valid[..., None], 0.0)
        queries = self.query_tokens.expand(len(grids), -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=rows, encoder_attention_mask=valid.long())
        return self.language_projection(out.last_hidden_state)
