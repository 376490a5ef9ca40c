"""The end-of-run summary: a readable table for the terminal and a plain-JSON ``summary.json``.

Plain Python only (no hydra, wandb or torch imports), so it can be used from ``train.py``, from
``experiments/report.py`` and from a notebook alike.

Example::

    >>> print(format_summary({"controller": "lqr", "test_acc": 0.88, "widths": {"net.1": 304},
    ...                       "dense_widths": {"net.1": 1024}}))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_KEYS", "format_summary", "to_plain", "write_summary"]

#: The keys ``train.py`` writes, in the order they appear in ``summary.json``.
SUMMARY_KEYS: tuple[str, ...] = (
    "controller",
    "importance",
    "target",
    "seed",
    "test_acc",
    "test_loss",
    "widths",
    "dense_widths",
    "left_dense",
    "flops_fraction",
    "train_flops_saved",
    "train_flops",
    "dense_train_flops",
    "train_time_s",
    "control_time_s",
    "control_overhead",
    "control_time_parts",
    "sensing_flops",
    "sensing_share",
    "fit_time_s",
    "steps",
    "world_size",
    "compiled",
    "compile_count",
    "compile_recompiles",
    "compile_time_s",
    "compile_resets",
    "peak_memory_mb",
    "trace",
)


def to_plain(value: Any) -> Any:
    """Convert ``value`` to JSON-ready plain types (dict/list/str/int/float/bool/None).

    Tensor and numpy scalars become numbers (via ``.item()``), arrays become lists (``.tolist()``),
    tuples and sets become lists, paths become strings, non-finite floats become ``None``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # 1-element tensor
        return to_plain(value.item())
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return to_plain(value.tolist())
    if hasattr(value, "item"):
        return to_plain(value.item())
    return str(value)


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``summary`` as indented JSON of plain types to ``path`` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_plain(summary), indent=2, allow_nan=False) + "\n")
    return path


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "pct" and isinstance(value, (int, float)):
        return f"{100 * value:.2f}%"
    if kind == "flops" and isinstance(value, (int, float)):
        return _si(float(value))
    if kind == "s" and isinstance(value, (int, float)):
        return f"{value:.2f} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _widths(widths: Any, dense: Any) -> list[tuple[str, str]]:
    if not isinstance(widths, Mapping) or not widths:
        if isinstance(dense, Mapping) and dense:
            return [(f"width {g}", f"n/a / {d}") for g, d in dense.items()]
        return [("widths", "n/a")]
    dense = dense if isinstance(dense, Mapping) else {}
    return [(f"width {g}", f"{w} / {dense.get(g, '?')}") for g, w in widths.items()]


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else _fmt(value)


def _pick_rows(trace: Sequence[Mapping[str, Any]], max_rows: int) -> list[int]:
    """Indices to show: every interval that cut or grew, the last one, then evenly spaced others up to ``max_rows``."""
    n = len(trace)
    if n <= max_rows:
        return list(range(n))
    cuts = [i for i, ev in enumerate(trace) if (ev.get("action") or 0) != 0]  # a growth's action is negative
    keep = set(cuts[: max_rows - 2]) | {0, n - 1}
    spare = max_rows - len(keep)
    if spare > 0:
        keep |= {round(j * (n - 1) / (spare + 1)) for j in range(1, spare + 1)}
    return sorted(keep)


def _trace_table(trace: Sequence[Mapping[str, Any]], max_rows: int) -> list[str]:
    cols = ("step", "compute", "damage", "action")
    rows = [
        [str(trace[i].get("step", "")), _num(trace[i].get("compute"), ".3f"),
         _num(trace[i].get("damage"), ".4f"), _num(trace[i].get("action"), ".3f")]
        for i in _pick_rows(trace, max_rows)
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [list(cols), *rows]]
    if len(rows) < len(trace):
        lines.append(f"({len(rows)} of {len(trace)} intervals shown: every cut and growth, the last, evenly spaced others)")
    return lines


def format_summary(summary: Mapping[str, Any], max_trace_rows: int = 20) -> str:
    """A readable multi-line table of a run summary (missing fields print as ``n/a``)."""
    rows: list[tuple[str, str]] = [
        ("controller", _fmt(summary.get("controller"))),
        ("importance", _fmt(summary.get("importance"))),
        ("target", _fmt(summary.get("target"))),
        ("seed", _fmt(summary.get("seed"))),
        ("test acc", _fmt(summary.get("test_acc"), "pct")),
        ("test loss", _fmt(summary.get("test_loss"))),
        *_widths(summary.get("widths"), summary.get("dense_widths")),
        ("FLOPs/step vs dense", _fmt(summary.get("flops_fraction"), "pct")),
        ("train FLOPs saved", _fmt(summary.get("train_flops_saved"), "pct")),
        ("train FLOPs", f"{_fmt(summary.get('train_flops'), 'flops')} "
                        f"(dense {_fmt(summary.get('dense_train_flops'), 'flops')})"),
        ("train time", _fmt(summary.get("train_time_s"), "s")),
        ("pruning overhead", f"{_fmt(summary.get('control_time_s'), 's')} "
                             f"({_fmt(summary.get('control_overhead'), 'pct')} of the train time"
                             + "".join(f"; {k} {v:.2f}s" for k, v in (summary.get("control_time_parts") or {}).items())
                             + ")"),
        ("fit wall-clock", _fmt(summary.get("fit_time_s"), "s")),
        ("steps", _fmt(summary.get("steps"))),
    ]
    if summary.get("compiled"):
        rows.append(("torch.compile", f"{_fmt(summary.get('compile_count'))} compilations "
                                      f"({_fmt(summary.get('compile_recompiles'))} after surgeries, "
                                      f"{_fmt(summary.get('compile_resets'))} resets), "
                                      f"{_fmt(summary.get('compile_time_s'), 's')}"))
    if summary.get("peak_memory_mb") is not None:
        rows.append(("peak memory", f"{_fmt(summary.get('peak_memory_mb'))} MiB"))
    key_w = max(len(k) for k, _ in rows)
    lines = ["ctprune summary", "-" * (key_w + 24)]
    lines += [f"{k.ljust(key_w)}  {v}" for k, v in rows]
    trace = summary.get("trace") or []
    if trace:
        lines += ["", f"controller trace ({len(trace)} intervals)"]
        lines += _trace_table(trace, max_trace_rows)
    lines += _spectra_lines(summary.get("history") or [])
    return "\n".join(lines)


def _spectra_lines(history: Sequence[Mapping[str, Any]], top: int = 6) -> list[str]:
    """Per SSM event: each layer's size change, kept Hankel energy and leading singular values."""
    out: list[str] = []
    for event in history:
        for layer, hsv in (event.get("hankel_spectra") or {}).items():
            if not hsv:
                continue
            r, n = (event.get("widths") or {}).get(layer, len(hsv)), len(hsv)
            kept = sum(hsv[:r]) / sum(hsv) if sum(hsv) > 0 else 1.0
            head = " ".join(f"{v:.3g}" for v in hsv[:top])
            out.append(f"step {event.get('step')}  {layer}: {n} -> {r} states, kept Hankel energy {kept:.3f};"
                       f" sigma = {head}{' ...' if n > top else ''}")
    return ["", "Hankel spectra at the SSM events", *out] if out else []
