"""``nn.Embedding``: the embedding dimension (weight columns); the vocabulary is never cut.

Only with ``prune_embeddings=True`` (the residual width of a transformer); new dimensions are drawn like
``nn.Embedding``'s init, N(0, 1), or (``GrowInit(mode="match")``) like the current weights.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import grow_parameter_
from ..shrink import shrink_embedding_dim_
from .base import Claim, ClaimContext, GrowInit, ParamSlice, SliceHandler, register

EMBEDDING_DIM = "embedding_dim"


def grow_embedding_dim_(embedding: nn.Embedding, n: int, optimizers: Sequence[Optimizer], init: GrowInit) -> None:
    """Append ``n`` embedding dimensions drawn like the layer's init."""
    fresh = init.normal(embedding.weight, (embedding.num_embeddings, n), 1.0)
    if embedding.padding_idx is not None:
        fresh[embedding.padding_idx] = 0
    grow_parameter_(embedding, "weight", fresh, 1, optimizers)
    embedding.embedding_dim += n


@register
class EmbeddingHandler(SliceHandler):
    kinds = {EMBEDDING_DIM: "out"}
    size_attrs = ("embedding_dim",)
    priority = 60

    def owns(self, module: nn.Module, kind: str) -> bool:
        return isinstance(module, nn.Embedding)

    def claims(self, module: nn.Module, is_out: bool, ctx: ClaimContext) -> Claim | str | None:
        if not isinstance(module, nn.Embedding):
            return None
        if not ctx.prune_embeddings:
            return ("embedding dimension of '{}' (vocabulary and embedding widths are never cut unless "
                    "prune_embeddings=True)")
        return Claim(EMBEDDING_DIM)

    def width(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> int:
        return int(module.embedding_dim)

    def unit_slices(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...]) -> list[ParamSlice]:
        return [ParamSlice("", "weight", 1, None)]

    def shrink_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], keep: Tensor,
                optimizers: Sequence[Optimizer]) -> None:
        shrink_embedding_dim_(module, keep, optimizers)

    def grow_(self, module: nn.Module, kind: str, block: int, parts: tuple[str, ...], n: int,
              optimizers: Sequence[Optimizer], init: GrowInit) -> None:
        grow_embedding_dim_(module, n, optimizers, init)
