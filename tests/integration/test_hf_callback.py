"""ControlPruning attached, as a user would, to LightningModules that wrap Hugging Face models.

The modules have no ``forward``, no ``compute_loss`` and no ``example_input_array``: ``training_step``
calls ``self.model(**batch)`` on a dict batch and returns the model's own loss. Tiny configs, no download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (the `hf` extra, part of `dev`)

from ctprune_lightning import ControlPruning, load_pruned  # noqa: E402
from ctprune_lightning.surgery.optim import live_parameters_missing  # noqa: E402

VOCAB, SEQ = 64, 8
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                                            n_inner=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=16, pad_token_id=0),
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
MODELS = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
          "bert": transformers.BertForMaskedLM}
# (attention group of layer 0, its unit count, MLP group of layer 0)
GROUPS = {"gpt2": ("model.transformer.h.0.attn", 4, "model.transformer.h.0.mlp.c_fc"),
          "llama": ("model.model.layers.0.self_attn", 2, "model.model.layers.0.mlp.gate_proj"),
          "bert": ("model.bert.encoder.layer.0.attention", 4, "model.bert.encoder.layer.0.intermediate.dense")}


def batches() -> list[dict[str, torch.Tensor]]:
    """A learnable token pattern: token t is followed by (t * 3 + 1) mod VOCAB."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (256, 1), generator=g)
    ids = [start]
    for _ in range(SEQ - 1):
        ids.append((ids[-1] * 3 + 1) % VOCAB)
    ids = torch.cat(ids, dim=1)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids[i]}
            for i in range(len(ids))]


class HFModule(L.LightningModule):
    """What a Hugging Face user writes: no forward; the HF model computes the loss."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MODELS[family](CONFIGS[family]())
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch, use_cache=False).loss if self.hparams.family != "bert" else self.model(**batch).loss
        if self.training:
            self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(batches(), batch_size=32, shuffle=False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hf_heads_and_mlp_shrink_and_training_continues(family: str, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = HFModule(family)
    cb = ControlPruning(controller="gmp", target=0.5, every_n_steps=4, importance="magnitude", min_width=8,
                        controller_kwargs={"start": 0.0, "end": 0.5})
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(module)
    s = cb.summary()
    attn, heads, mlp = GROUPS[family]
    units = {g.name: g.unit for g in cb.groups}
    assert units[attn] == "head" and units[mlp] == "channel", units
    assert s["dense_widths"][attn] == heads and s["dense_widths"][mlp] == 128
    assert s["surgeries"] >= 2 and s["train_flops_saved"] > 0.1
    assert s["widths"][mlp] < 128 and any(s["widths"][g] < s["dense_widths"][g] for g in units if units[g] == "head")
    assert live_parameters_missing(module, trainer.optimizers) == []
    assert len([p for g in trainer.optimizers[0].param_groups for p in g["params"]]) == len(list(module.parameters()))
    losses = torch.tensor(module.losses)
    assert torch.isfinite(losses).all() and losses[-4:].mean() < 0.8 * losses[:4].mean()
    rebuilt = load_pruned(HFModule, tmp_path / "last.ckpt")
    for (name, a), (_, b) in zip(module.state_dict().items(), rebuilt.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), name
    batch = {k: torch.stack([b[k] for b in batches()[:4]]) for k in ("input_ids", "attention_mask")}
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model(**batch).logits, module.model(**batch).logits)
