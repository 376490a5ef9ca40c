"""Suite-wide setup: no network, no W&B uploads, caches in a temp dir.

The environment is set at import (before any test module imports wandb, datasets or lightning), so
subprocesses started by tests inherit it too.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_TMP = Path(tempfile.mkdtemp(prefix="ctprune-tests-"))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_DIR"] = str(_TMP / "wandb")
os.environ["HF_HOME"] = str(_TMP / "hf")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
(_TMP / "wandb").mkdir(exist_ok=True)

# Property tests draw the same examples on every machine and run (no example database), so a fresh
# machine cannot find a new failing example the last one never saw; HYPOTHESIS_PROFILE=random explores.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ctprune", derandomize=True, database=None, print_blob=True)
_hypothesis_settings.register_profile("random", database=None)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ctprune"))

# `import train` (the Hydra entry point at the repo root) and the package without an install.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on two shared cores, two contending threads run small SSM work several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
