"""A character-level GPT (nanoGPT-sized for a CPU) as a LightningModule.

Attention heads are prunable: :class:`CausalSelfAttention` keeps its head count in ``n_head`` and
reads it on every forward, so the surgery (:mod:`ctprune_lightning.surgery.attention`) can drop heads
by slicing ``c_attn`` (the fused q/k/v projection) and ``c_proj`` (the output projection) and lowering
``n_head``. The residual width ``n_embd`` is never touched by head pruning.

Example::

    model = GPTLanguageModel(vocab_size=65, n_layer=4, n_head=4, n_embd=192, block_size=128)
    lightning.Trainer(max_steps=2000).fit(model, datamodule=ShakespeareDataModule(block_size=128))
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctprune_lightning.models.common import (check_optim_args, configure_optimizer_and_scheduler, decay_groups,
                                             step_log_due)

LN2 = math.log(2.0)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection.

    ``c_attn``: (n_embd -> 3 * n_head * head_dim), laid out [q | k | v], each head-major;
    ``c_proj``: (n_head * head_dim -> n_embd). ``n_head`` is derived from ``c_proj``'s width at every
    forward, so a model rebuilt from recorded tensor shapes (a checkpoint) has the right head count.
    """

    def __init__(self, n_embd: int, n_head: int, head_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        if head_dim is None:
            if n_embd % n_head:
                raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head} (or pass head_dim)")
            head_dim = n_embd // n_head
        self.head_dim, self.dropout = int(head_dim), float(dropout)
        inner = int(n_head) * self.head_dim
        self.c_attn = nn.Linear(n_embd, 3 * inner, bias=bias)
        self.c_proj = nn.Linear(inner, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    @property
    def n_head(self) -> int:
        return self.c_proj.in_features // self.head_dim

    @n_head.setter
    def n_head(self, value: int) -> None:  # the surgery sets it after cutting the projections
        if int(value) != self.n_head:
            raise ValueError(f"n_head={value} disagrees with c_proj.in_features={self.c_proj.in_features} "
                             f"(head_dim {self.head_dim}); cut the projections first")

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(inner, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, inner)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(n_embd, hidden), GELU, Linear(hidden, n_embd)."""

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout=dropout, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head (tied to the embedding)."""

    def __init__(self, vocab_size: int, block_size: int = 128, n_layer: int = 4, n_head: int = 4, n_embd: int = 192,
                 mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True, tie_weights: bool = True) -> None:
        super().__init__()
        self.block_size = int(block_size)
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), T <= block_size."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPTLanguageModel(L.LightningModule):
    """Character-level language model; losses are in nats per character (``*/bpc``: bits per character).

    Logs ``train/loss``, ``val/loss``, ``val/bpc``, ``test/loss``, ``test/bpc``.
    """

    def __init__(self, vocab_size: int = 65, block_size: int = 128, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 192, mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True,
                 tie_weights: bool = True, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.99), momentum: float = 0.9, scheduler: str = "cosine",
                 warmup_steps: int = 100) -> None:
        super().__init__()
        check_optim_args(optimizer, scheduler, lr, warmup_steps)
        if int(vocab_size) < 2 or int(block_size) < 1 or int(n_layer) < 1 or int(n_head) < 1:
            raise ValueError(f"need vocab_size >= 2, block_size >= 1, n_layer >= 1, n_head >= 1; got "
                             f"{vocab_size=}, {block_size=}, {n_layer=}, {n_head=}")
        if int(n_embd) % int(n_head):
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters()
        self.model = GPT(int(vocab_size), int(block_size), int(n_layer), int(n_head), int(n_embd), int(mlp_ratio),
                         float(dropout), bool(bias), bool(tie_weights))
        self.example_input_array = torch.zeros(2, int(block_size), dtype=torch.long)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean next-character cross-entropy in nats."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        if step_log_due(self):
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        loss = self.compute_loss(batch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/bpc", loss / LN2, on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` characters after the context ``idx`` (B, T)."""
        for _ in range(int(max_new_tokens)):
            logits = self(idx[:, -self.model.block_size:])[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1)), dim=1)
        return idx

    def configure_optimizers(self) -> Any:
        return configure_optimizer_and_scheduler(self, decay_groups(self, self.hparams.weight_decay))
