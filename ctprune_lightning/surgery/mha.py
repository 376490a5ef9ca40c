"""``nn.MultiheadAttention`` whose heads can be cut: a drop-in with the same forward and state dict.

``nn.MultiheadAttention`` cannot lose a head: ``F.multi_head_attention_forward`` derives
``head_dim = embed_dim // num_heads`` and requires ``in_proj_weight`` of shape (3*embed_dim, embed_dim),
so its inner width (num_heads * head_dim) is tied to ``embed_dim``, the residual width. Here the inner
width is free: after keeping ``h`` heads, ``in_proj_weight`` has 3*h*head_dim rows and ``out_proj`` has
h*head_dim input columns, while ``embed_dim`` (the input and output width) is unchanged. The forward is
the attention of Vaswani et al. 2017 ("Attention Is All You Need", §3.2), computed with
``F.scaled_dot_product_attention`` when no weights are asked for, with an explicit softmax otherwise.

Parameter names are those of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``q/k/v_proj_weight`` when kdim or vdim differ from embed_dim, ``bias_k``, ``bias_v``,
``out_proj.weight``, ``out_proj.bias``), so state dicts load either way while the heads are all there.

Convert *before* the optimizer is built (the optimizer must hold the new Parameters)::

    names = convert_multihead_attention_(model)          # ["encoder.layers.0.self_attn", ...]
    shrink_mha_heads_(model.get_submodule(names[0]), torch.tensor([0, 2]), optimizers)   # 4 heads -> 2
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .optim import replace_parameter_
from .shrink import _check_keep, expand_units

PROJ_WEIGHTS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
MHA_PARTS = ("out_proj",)  # the slices' ``parts``: q/k/v live in the module's own in_proj_weight, not in children


class PrunableMultiheadAttention(nn.Module):
    """Multi-head attention with a free inner width: ``num_heads * head_dim`` may be below ``embed_dim``.

    Arguments as ``nn.MultiheadAttention``, plus ``head_dim`` (default ``embed_dim // num_heads``).

    ``_qkv_same_embed_dim`` is what torch's fused kernels read (the fast paths of
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in eval without grad): it is True only
    while the module is exactly what those kernels compute (packed ``in_proj_weight``, all heads,
    inner width = embed_dim, no ``bias_k`` / ``add_zero_attn``), so after a cut the layer calls this
    module's forward instead.

    Example::

        attn = PrunableMultiheadAttention(16, 4, batch_first=True)
        out, weights = attn(x, x, x)                # like nn.MultiheadAttention
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, head_dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1:
            raise ValueError(f"embed_dim and num_heads must be >= 1, got embed_dim={embed_dim}, num_heads={num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                                 "(or give head_dim)")
            head_dim = embed_dim // num_heads
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        inner = self.num_heads * self.head_dim
        if self.kdim == self.embed_dim and self.vdim == self.embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, self.embed_dim, **kw))
            for name in PROJ_WEIGHTS:
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            for name, width in zip(PROJ_WEIGHTS, (self.embed_dim, self.kdim, self.vdim)):
                setattr(self, name, nn.Parameter(torch.empty(inner, width, **kw)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **kw))
            self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **kw))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The initialisation of ``nn.MultiheadAttention``."""
        for p in (self.in_proj_weight, *(getattr(self, n) for n in PROJ_WEIGHTS)):
            if p is not None:
                nn.init.xavier_uniform_(p)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for p in (self.bias_k, self.bias_v):
            if p is not None:
                nn.init.xavier_normal_(p)

    @property
    def _qkv_same_embed_dim(self) -> bool:  # read by torch's fused fast paths; see the class docstring
        return (self.in_proj_weight is not None and self.num_heads * self.head_dim == self.embed_dim
                and self.in_proj_weight.shape == (3 * self.embed_dim, self.embed_dim)
                and self.bias_k is None and not self.add_zero_attn)

    merge_masks = nn.MultiheadAttention.merge_masks  # used by torch's fast paths while all heads are kept

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "PrunableMultiheadAttention":
        """A copy of ``mha`` (same weights, dtype, device, options and training mode)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_module: expected nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                  mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, mha.head_dim, ref.device, ref.dtype)
        new.load_state_dict(mha.state_dict())
        for name, p in mha.named_parameters():
            new.get_parameter(name).requires_grad_(p.requires_grad)
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same: bool) -> tuple[Tensor, Tensor, Tensor]:
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self.in_proj_weight is None:
            weights = tuple(getattr(self, n) for n in PROJ_WEIGHTS)
        elif same:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            weights = self.in_proj_weight.chunk(3)
        return tuple(F.linear(x, w, bb) for x, w, bb in zip((query, key, value), weights, b))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; a 3-D ``attn_mask`` has ``batch * num_heads`` (kept heads) rows."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("PrunableMultiheadAttention does not take NestedTensor inputs (set "
                             "use_nested_tensor=False on the nn.TransformerEncoder; convert_multihead_attention_ "
                             "does this)")
        same = query is key and key is value
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention); "
                               "nn.Transformer.generate_square_subsequent_mask makes one")
        causal = is_causal and key_padding_mask is None and not need_weights  # else the mask itself is used
        attn_mask = None if causal else F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                                          other_name="", target_type=query.dtype, check_other=False)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        heads, dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, same)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)  # key/value slots appended
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
        q, k, v = (t.reshape(n, t.shape[1], heads, dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(n, heads, 1, dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        mask = _merged_mask(attn_mask, key_padding_mask, n, heads, tgt, src, extra)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(dim)), k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout_p > 0:  # nn.MultiheadAttention returns the weights after dropout, too
                weights = F.dropout(weights, dropout_p)
            out = torch.matmul(weights, v)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, heads * dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, heads: int, tgt: int,
                 src: int, extra: int) -> Tensor | None:
    """One additive float mask broadcastable to (n, heads, tgt, src + extra); shapes checked as torch does."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt, src):
            mask = attn_mask.view(1, 1, tgt, src)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (n * heads, tgt, src):
            mask = attn_mask.view(n, heads, tgt, src)
        else:
            raise RuntimeError(f"attn_mask has shape {tuple(attn_mask.shape)}; allowed: ({tgt}, {src}) or "
                               f"(batch * num_heads = {n * heads}, {tgt}, {src})")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (n, src):
            raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected ({n}, {src})")
        kpm = key_padding_mask.view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return F.pad(mask, (0, extra)) if mask is not None and extra else mask


def convert_multihead_attention_(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` by a :class:`PrunableMultiheadAttention` in place.

    Weights are copied exactly. Call it *before* the optimizer is built: an optimizer made earlier holds
    the replaced Parameters and would stop training the attention. ``nn.TransformerEncoder`` parents get
    ``use_nested_tensor = False`` (their NestedTensor path would bypass the converted layers' forward).
    Returns the qualified names of the converted modules.

    >>> layer = nn.TransformerEncoderLayer(16, 4, batch_first=True)
    >>> convert_multihead_attention_(layer)
    ['self_attn']
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("convert_multihead_attention_: pass the model that contains the nn.MultiheadAttention "
                        "(or use PrunableMultiheadAttention.from_module)")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, PrunableMultiheadAttention.from_module(getattr(parent, attr)))
    if names:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
    return names


def _heads_rows(attn: PrunableMultiheadAttention, keep: Tensor) -> tuple[Tensor, Tensor]:
    """(rows of one q/k/v section, rows of the packed [q|k|v] tensors) that belong to heads ``keep``."""
    rows = expand_units(keep, attn.head_dim)
    inner = attn.num_heads * attn.head_dim
    return rows, torch.cat([rows + s * inner for s in range(3)])


def _section_heads(attn: PrunableMultiheadAttention, packed: bool) -> Tensor:
    """The head owning each row of a q/k/v section (``packed``: of the [q|k|v] tensors)."""
    units = torch.arange(attn.num_heads).repeat_interleave(attn.head_dim)
    return units.repeat(3) if packed else units


def mha_head_slices(attn: PrunableMultiheadAttention) -> list[tuple[str, int, Tensor]]:
    """``(parameter name, dim, head of each index)`` for every tensor a head cut slices."""
    packed, section = _section_heads(attn, True), _section_heads(attn, False)
    out = [("in_proj_weight", 0, packed)] if attn.in_proj_weight is not None else [
        (n, 0, section) for n in PROJ_WEIGHTS]
    if attn.in_proj_bias is not None:
        out.append(("in_proj_bias", 0, packed))
    out += [(n, 2, section) for n in ("bias_k", "bias_v") if getattr(attn, n) is not None]
    return out + [("out_proj.weight", 1, section)]


def shrink_mha_heads_(attn: PrunableMultiheadAttention, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the heads ``keep`` (sorted, unique) of ``attn``; ``embed_dim`` does not change.

    Slices the q, k and v rows of each kept head, ``bias_k`` / ``bias_v`` and the output projection's
    input columns, with the optimizer state (:func:`ctprune_lightning.surgery.optim.replace_parameter_`).
    """
    if not isinstance(attn, PrunableMultiheadAttention):
        raise TypeError(f"shrink_mha_heads_: expected PrunableMultiheadAttention, got {type(attn).__name__} "
                        "(convert nn.MultiheadAttention first with convert_multihead_attention_)")
    _check_keep(keep, attn.num_heads, "shrink_mha_heads_")
    optimizers = list(optimizers)
    section, packed = _heads_rows(attn, keep)
    if attn.in_proj_weight is not None:
        replace_parameter_(attn, "in_proj_weight", packed, 0, optimizers)
    else:
        for name in PROJ_WEIGHTS:
            replace_parameter_(attn, name, section, 0, optimizers)
    if attn.in_proj_bias is not None:
        replace_parameter_(attn, "in_proj_bias", packed, 0, optimizers)
    for name in ("bias_k", "bias_v"):
        if getattr(attn, name) is not None:
            replace_parameter_(attn, name, section, 2, optimizers)
    replace_parameter_(attn.out_proj, "weight", section, 1, optimizers)
    attn.out_proj.in_features = int(section.numel())
    attn.num_heads = int(keep.numel())


def _stand_in(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, None]:
    """While tracing (the handler's ``trace_hook``): an output whose autograd graph leads straight to the inputs.

    Torch-Pruning follows the autograd graph, so it would walk through the packed projection's split and the
    head reshapes and couple them to the residual wrongly (or never terminate). The stand-in is ``query (+ mean
    of key and value)``: the same shape, coupled channel by channel to the inputs, as the opaque layer it is.
    """
    query, key, value = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(("query", "key", "value")))
    seq = 0 if query.dim() == 2 or not module.batch_first else 1
    out = query.clone()  # a new autograd node (the query's own belongs to its producer)
    if module.in_proj_weight is not None:  # packed: query, key and value share the input width
        out = out + key.mean(seq, keepdim=True) + value.mean(seq, keepdim=True)
    return out, None


def embed_refusal(attn: PrunableMultiheadAttention) -> str | None:
    """Why the residual width (``embed_dim``) of ``attn`` cannot be cut, or None."""
    if attn.in_proj_weight is None:
        return (f"kdim={attn.kdim} / vdim={attn.vdim} differ from embed_dim={attn.embed_dim}: key and value come "
                "from another width than the query")
    return None


def shrink_mha_embed_in_(attn: PrunableMultiheadAttention, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the input features ``keep`` of the packed q/k/v projection (the residual width going in).

    Only for packed ``in_proj_weight`` (kdim = vdim = embed_dim): query, key and value share the width.
    """
    why = embed_refusal(attn)
    if why:
        raise ValueError(f"shrink_mha_embed_in_: {why}")
    _check_keep(keep, attn.in_proj_weight.shape[1], "shrink_mha_embed_in_")
    replace_parameter_(attn, "in_proj_weight", keep, 1, optimizers)
    attn.embed_dim = attn.kdim = attn.vdim = int(keep.numel())


def shrink_mha_embed_out_(attn: PrunableMultiheadAttention, keep: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
    """Keep only the output features ``keep`` of ``out_proj`` (the residual width coming out)."""
    why = embed_refusal(attn)
    if why:
        raise ValueError(f"shrink_mha_embed_out_: {why}")
    _check_keep(keep, attn.out_proj.out_features, "shrink_mha_embed_out_")
    optimizers = list(optimizers)
    replace_parameter_(attn.out_proj, "weight", keep, 0, optimizers)
    if attn.out_proj.bias is not None:
        replace_parameter_(attn.out_proj, "bias", keep, 0, optimizers)
    attn.out_proj.out_features = attn.embed_dim = int(keep.numel())
