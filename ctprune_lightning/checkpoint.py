"""Checkpoints of a model whose architecture changed during training.

The checkpoint carries ``checkpoint["ctprune"] = {"version": 1, "arch": {...}, "history": [...]}``
(plain Python; see :mod:`ctprune_lightning.surgery.arch`). Lightning restores the weights *before*
any callback's ``load_state_dict`` runs, so :func:`install_checkpoint_hooks` makes the strategy rebuild
the model to the checkpoint's shapes first (growing modules back when the checkpoint is wider).

Example::

    model = load_pruned(MyLightningModule, "epoch=3.ckpt")     # ready for inference
    export_pruned(model, "model.pt")                            # plain state_dict + arch spec
    model = load_pruned(MyLightningModule, "model.pt")
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

from .shadows import follow_, shadow_models
from .surgery.arch import ArchSpecError, apply_arch_, capture_arch, check_arch, check_state_dict

CTPRUNE_KEY = "ctprune"
SPEC_VERSION = 1
SUPPORTED_VERSIONS = (1,)

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ArchSpecError):
    """A checkpoint file that cannot be read or does not fit the model."""


def make_spec(model: nn.Module, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``checkpoint["ctprune"]`` entry for ``model`` as it is now."""
    return {"version": SPEC_VERSION, "arch": capture_arch(model), "history": list(history or [])}


def read_spec(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The validated ``ctprune`` entry of a loaded checkpoint, or None when it has none."""
    spec = checkpoint.get(CTPRUNE_KEY)
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "arch" not in spec:
        raise CheckpointError(f"{source}: checkpoint['{CTPRUNE_KEY}'] is not a ctprune spec (no 'arch')")
    version = spec.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{source}: ctprune spec version {version!r} is not supported "
                              f"(this ctprune_lightning reads versions {list(SUPPORTED_VERSIONS)})")
    return dict(spec)


#: the file in a sharded (``torch.distributed.checkpoint``) checkpoint folder that holds everything but the tensors
SHARDED_META = "meta.pt"


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint (truncated or corrupt file?): {err}") from err


def read_checkpoint_spec(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``ctprune`` spec of a checkpoint file or sharded checkpoint folder, without loading its shards."""
    path = Path(path)
    if path.is_dir():
        if not (path / SHARDED_META).is_file():
            raise CheckpointError(f"{path}: a folder, but not a sharded checkpoint (no {SHARDED_META})")
        return read_spec(_load(path / SHARDED_META), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    checkpoint = _load(path)
    return read_spec(checkpoint, str(path)) if isinstance(checkpoint, Mapping) else None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem.

    A sharded checkpoint folder (FSDP2, ``torch.distributed.checkpoint``) is assembled into one full
    checkpoint in CPU memory, on one process.
    """
    path = Path(path)
    if path.is_dir() and not (path / SHARDED_META).is_file():
        raise CheckpointError(f"{path}: a folder, but not a sharded checkpoint (no {SHARDED_META})")
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load(path / SHARDED_META)
        try:
            shards = _load_distributed_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - torch.distributed.checkpoint raises many types
            raise CheckpointError(f"{path}: its shards cannot be read (incomplete or corrupt?): {err}") from err
        checkpoint = dict(checkpoint) | {"state_dict": shards.get("state_dict", {})}
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    else:
        checkpoint = _load(path)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a model checkpoint (no 'state_dict' entry)")
    return dict(checkpoint)


def rebuild_from_checkpoint_(model: nn.Module, checkpoint: Mapping[str, Any], source: str,
                             strict: bool = True) -> bool:
    """Rebuild ``model`` to the checkpoint's architecture after checking that its weights will fit.

    Returns False (and changes nothing) for a checkpoint without a ctprune spec.
    """
    spec = read_spec(checkpoint, source)
    if spec is None:
        return False
    from .surgery.mha import convert_multihead_attention_

    convert_multihead_attention_(model)  # a checkpoint may hold attention with fewer heads (same state-dict names)
    check_arch(model, spec["arch"], source)
    check_state_dict(model, spec["arch"], checkpoint["state_dict"], source, strict=strict)
    apply_arch_(model, spec["arch"], source)
    return True


@torch.no_grad()
def shrink_to_checkpoint_(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Shrink a freshly built ``model`` to the architecture recorded in checkpoint ``path``; keep its fresh weights.

    Every cut tensor keeps its first entries along each shrunk dimension: a restriction of the model's
    own random initialisation (entries are i.i.d., so which units does not matter). The checkpoint's
    weights are not read. This is the "pruned architecture trained from scratch" baseline of Liu et al.,
    *Rethinking the Value of Network Pruning* (ICLR 2019). Returns the checkpoint's spec.
    """
    spec = read_checkpoint_spec(path)
    if spec is None:
        raise CheckpointError(f"{path}: holds no ctprune architecture (written without ControlPruning?)")
    from .surgery.mha import convert_multihead_attention_

    convert_multihead_attention_(model)
    check_arch(model, spec["arch"], str(path))
    for module_name, entry in spec["arch"].items():  # refuse before changing anything: no half-shrunk model
        module = model.get_submodule(module_name)
        for tname, shape in entry.get("shapes", {}).items():
            have = tuple(getattr(module, tname).shape)
            if len(shape) != len(have) or any(int(n) > o for n, o in zip(shape, have)):
                name = f"{module_name}.{tname}" if module_name else tname
                raise CheckpointError(f"{path}: {name} has shape {tuple(shape)} there, wider than the fresh model's "
                                      f"{have}; build the model with at least the checkpoint's sizes")
    fresh = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
    apply_arch_(model, spec["arch"], str(path))
    for name, t in model.state_dict(keep_vars=True).items():
        t.data.copy_(fresh[name][tuple(slice(0, n) for n in t.shape)])
    return spec


def install_checkpoint_hooks(trainer: Any) -> None:
    """Make ``trainer.strategy`` rebuild the architecture before it loads a checkpoint's weights, and record it in
    every checkpoint it saves (weights-only ones too).

    Idempotent. Also turns unreadable files into a :class:`CheckpointError` naming the file.
    """
    strategy = trainer.strategy
    if getattr(strategy, "_ctprune_hooks", False):
        return
    load_checkpoint, load_model_state_dict = strategy.load_checkpoint, strategy.load_model_state_dict

    def load_checkpoint_named(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load_checkpoint(checkpoint_path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{checkpoint_path}: cannot be read as a checkpoint "
                                  f"(truncated or corrupt file?): {err}") from err

    def load_model_state_dict_rebuilt(checkpoint: Mapping[str, Any], strict: bool = True, **kwargs: Any) -> Any:
        rebuild_from_checkpoint_(strategy.lightning_module, checkpoint, str(trainer.ckpt_path), strict=strict)
        loaded = load_model_state_dict(checkpoint, strict=strict, **kwargs)
        for shadow in shadow_models(trainer.callbacks):  # built dense at setup; their own states load next
            follow_(shadow, strategy.lightning_module)
        return loaded

    save_checkpoint = strategy.save_checkpoint

    def save_checkpoint_with_spec(checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # a weights-only save (ModelCheckpoint(save_weights_only=True)) skips the callbacks' on_save_checkpoint:
        # the architecture is recorded here, so load_pruned and a resume can still rebuild it
        if CTPRUNE_KEY not in checkpoint and "state_dict" in checkpoint:
            checkpoint[CTPRUNE_KEY] = make_spec(strategy.lightning_module)
        return save_checkpoint(checkpoint, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint_named
    if not getattr(strategy, "rebuilds_from_checkpoint", False):  # a pruning FSDP strategy rebuilds itself
        strategy.load_model_state_dict = load_model_state_dict_rebuilt
        strategy.save_checkpoint = save_checkpoint_with_spec
    strategy._ctprune_hooks = True


def load_pruned(module_class: type[M], path: str | os.PathLike, **overrides: Any) -> M:
    """Rebuild a (pruned) model from a Lightning checkpoint or an :func:`export_pruned` file.

    The class is built from the file's ``hyper_parameters`` (updated by ``overrides``), rebuilt to the
    recorded architecture, loaded, and put in eval mode.
    """
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.update(overrides)
    try:
        model = module_class(**hparams)
    except TypeError as err:
        raise CheckpointError(f"{path}: its hyper-parameters {sorted(hparams)} do not build "
                              f"{module_class.__name__}: {err}") from err
    if not rebuild_from_checkpoint_(model, checkpoint, str(path)):
        check_state_dict(model, {}, checkpoint["state_dict"], str(path))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def export_pruned(model: nn.Module, path: str | os.PathLike, history: list[dict[str, Any]] | None = None) -> Path:
    """Write ``{"state_dict", "hyper_parameters", "ctprune"}``, loadable with ``weights_only=True``."""
    hparams = getattr(model, "hparams", None)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": _plain(dict(hparams)) if hparams else {},
        CTPRUNE_KEY: make_spec(model, history),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
