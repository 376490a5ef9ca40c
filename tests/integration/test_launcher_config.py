"""The SLURM launcher config (conf/hydra/launcher/submitit_slurm.yaml) composes, instantiates the plugin and
writes the sbatch script we document; there is no cluster here, so `srun`/`sbatch` are stand-ins on PATH."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import train

import hydra_plugins.hydra_submitit_launcher  # noqa: E402,F401  (the `experiments` extra: a missing install fails here)
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf  # noqa: E402
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher  # noqa: E402

TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
SWEEP = ["hydra/launcher=submitit_slurm", "trainer=ddp_gpu", "trainer.num_nodes=2"]


@pytest.fixture(scope="module")
def hydra_init() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base="1.3"):
        yield


def compose_cfg(overrides: list[str]) -> DictConfig:
    with warnings.catch_warnings():  # Hydra 1.3: "validated against ConfigStore schema with the same name"
        warnings.simplefilter("ignore", UserWarning)
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def test_launcher_composes_with_the_multi_node_trainer(hydra_init: None) -> None:
    cfg = compose_cfg(SWEEP)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == TARGET
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert launcher.nodes == 2 == cfg.trainer.num_nodes  # follows trainer.num_nodes
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4  # one task (process) per GPU
    assert launcher.gpus_per_task is None  # each task sees its node's GPUs: Lightning picks one by local rank
    assert launcher.cpus_per_task == 8 and launcher.timeout_min == 120 and launcher.partition is None
    assert launcher.max_num_timeout == 0 and launcher.array_parallelism == 256
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    assert list(launcher.setup) == ["export OMP_NUM_THREADS=8"]
    assert cfg.trainer.strategy == "ctprune_ddp" and cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == "auto"
    # every key is a field of the plugin's schema (no typo silently ignored), and all of them are set
    assert set(launcher) == set(OmegaConf.structured(SlurmQueueConf))


def test_launcher_fields_follow_overrides(hydra_init: None) -> None:
    cfg = compose_cfg(["hydra/launcher=submitit_slurm", "trainer=ddp_gpu", "trainer.num_nodes=3",
                       "hydra.launcher.gpus_per_node=8", "hydra.launcher.partition=gpu"])
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.partition) == (3, 8, "gpu")
    fsdp = ["hydra/launcher=submitit_slurm", "trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=auto"]
    assert compose_cfg(fsdp).hydra.launcher.nodes == 1 == compose_cfg(fsdp).trainer.num_nodes  # one node by default
    cfg = compose_cfg([*fsdp, "trainer.num_nodes=2"])
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.tasks_per_node == 4
    assert cfg.trainer.strategy._target_ == "ctprune_lightning.PruningFSDPStrategy" and cfg.trainer.devices == "auto"
    with pytest.raises(Exception, match="gpus_per_node"):  # the schema checks types
        compose_cfg([*SWEEP, "hydra.launcher.gpus_per_node=many"])


def test_default_launcher_is_untouched(hydra_init: None) -> None:
    assert compose_cfg([]).hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_plugin_class_imports_and_instantiates(hydra_init: None) -> None:
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    # Hydra's plugin scan finds it (it may load the module a second time: compare classes by name)
    found = {f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(Launcher)}
    assert TARGET in found and f"{SlurmLauncher.__module__}.{SlurmLauncher.__qualname__}" == TARGET
    launcher = instantiate(compose_cfg(SWEEP).hydra.launcher)
    assert f"{type(launcher).__module__}.{type(launcher).__qualname__}" == TARGET and launcher._EXECUTOR == "slurm"
    assert launcher.params["nodes"] == 2 and launcher.params["tasks_per_node"] == 4
    assert launcher.params["setup"] == ["export OMP_NUM_THREADS=8"]  # interpolations resolved


def _task(cfg: DictConfig) -> None:  # pickled by reference into the (never run) jobs
    raise AssertionError("runs on the cluster only")


def test_sweep_submits_one_array_job_per_run(hydra_init: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's own launch(): 2 controllers x 3 seeds -> one sbatch array of 6 jobs, 2 nodes x 4 tasks each."""
    import submitit
    from hydra.core.utils import JobReturn
    from hydra.types import HydraContext

    bin_dir, script = tmp_path / "bin", tmp_path / "sbatch_script.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{script}"\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/bin')}:{Path('/usr/bin')}")
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: [JobReturn()])  # no cluster to wait on

    cfg = compose_cfg([*SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=_task, config=cfg)
    runs = [[f"controller={c}", f"seed={s}"] for c, s in itertools.product(("lqr", "pid"), (0, 1, 2))]
    assert len(launcher.launch(runs, initial_job_idx=0)) == 6

    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=120", "#SBATCH --array=0-5%6",
                 "#SBATCH --job-name=app", "export OMP_NUM_THREADS=8"):
        assert line in text.splitlines(), (line, text)
    assert "--partition" not in text and "--gpus-per-task" not in text
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith("-m submitit.core._submit " + str(tmp_path / "sweep" / ".submitit" / "%j"))
    assert len(list((tmp_path / "sweep" / ".submitit").glob("4242_*/*_submitted.pkl"))) == 6
