"""Tier 1: every option of every config group composes, resolves and instantiates (no training)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ctprune_lightning import PruningDDPStrategy, PruningFSDPStrategy

import train

CONF = train.CONFIG_DIR
# Groups whose options are composed one by one; hydra/paths are covered by every composition.
GROUPS = ("model", "dataset", "controller", "importance", "pruning", "callbacks", "trainer",
          "logger", "debug", "experiment", "check")
CONTROLLERS = ("none", "gmp", "linear", "pid", "lqr")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.fixture(scope="module")
def hydra_init() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_cfg(overrides: list[str], out: Path) -> DictConfig:
    """Compose like `python train.py <overrides>` would, with the run dir at ``out``."""
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg.hydra
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def test_groups_have_the_expected_options() -> None:
    assert set(CONTROLLERS) <= set(options("controller"))
    assert {"magnitude", "taylor", "trajectory"} <= set(options("importance"))
    assert {"wandb", "csv", "many"} <= set(options("logger"))
    assert {"default", "cpu"} <= set(options("trainer"))
    assert {"fashion_mnist", "synthetic"} <= set(options("dataset"))


def test_defaults(hydra_init: None, tmp_path: Path) -> None:
    cfg = compose_cfg([], tmp_path)
    assert cfg.seed == 0 and cfg.run_test is True
    assert cfg.dataset._target_.endswith("FashionMNISTDataModule")
    assert cfg.dataset.batch_size == 256 and cfg.dataset.num_workers == 0
    assert list(cfg.model.hidden) == [1024, 1024] and cfg.model.lr == 1e-3
    assert cfg.controller._target_.endswith("LQRController")
    assert cfg.pruning.target == 0.25 and cfg.controller.target == 0.25
    assert cfg.trainer.max_epochs == 8 and cfg.trainer.enable_checkpointing is True
    assert set(cfg.logger) == {"csv", "wandb"}
    assert cfg.logger.wandb.project == "ctprune_lightning"
    assert cfg.logger.wandb.save_dir == str(tmp_path)


def _leaves(node: object, keys: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(key path, value) of every leaf of a plain config, lists as leaves."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*keys, str(k)))
    else:
        yield keys, node


def _expected(group: str, option: str) -> dict:
    """The literal content an option should compose to: its defaults (other options of its group, or
    ``override /group: option`` entries, placed under their group) merged under its own body."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False) or {}
    out = OmegaConf.create({})
    for entry in raw.pop("defaults", []):
        if isinstance(entry, str) and (CONF / group / f"{entry}.yaml").exists():
            out = OmegaConf.merge(out, _expected(group, entry))
        elif isinstance(entry, dict):
            for key, sub in entry.items():
                sub_group = key.removeprefix("override").strip().lstrip("/")
                if isinstance(sub, str) and (CONF / sub_group / f"{sub}.yaml").exists():
                    out = OmegaConf.merge(out, {sub_group: _expected(sub_group, sub)})
    return OmegaConf.to_container(OmegaConf.merge(out, raw), resolve=False)


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes(hydra_init: None, tmp_path: Path, group: str, option: str) -> None:
    """The option is the one composed: every literal value of its file is in the result, at its package."""
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    path = CONF / group / f"{option}.yaml"
    raw = _expected(group, option)
    root = cfg if path.read_text().startswith("# @package _global_") else cfg[group]
    if not raw:  # an empty option (callbacks=none): the group is empty
        assert not root, root
        return
    checked = 0
    for keys, value in _leaves(raw):
        if isinstance(value, str) and "${" in value or isinstance(value, list) and "${" in str(value):
            continue  # interpolations: resolved above (OmegaConf.resolve), their values depend on other groups
        got = OmegaConf.select(root, ".".join(keys), throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, (".".join(keys), got, value)
        checked += 1
    assert checked > 0, f"{path.name} has no literal value to check"
    assert cfg.seed == (raw.get("seed", 0) if root is cfg else 0) and isinstance(cfg.trainer.max_epochs, int)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_controller_and_callbacks_instantiate(hydra_init: None, tmp_path: Path, controller: str) -> None:
    from ctprune_lightning import ControlPruning
    from ctprune_lightning.controllers import Controller

    cfg = compose_cfg([f"controller={controller}", "debug=fast"], tmp_path)
    ctrl = instantiate(cfg.controller)
    assert isinstance(ctrl, Controller)
    assert ctrl.target == (1.0 if controller == "none" else cfg.pruning.target)
    callbacks = train.instantiate_callbacks(cfg)
    assert [type(c).__name__ for c in callbacks] == ["ControlPruning", "ModelCheckpoint"]
    assert isinstance(callbacks[0], ControlPruning) and train.find_pruning_callback(callbacks) is callbacks[0]


@pytest.mark.parametrize("importance", options("importance"))
def test_importance_options_build_the_callback(hydra_init: None, tmp_path: Path, importance: str) -> None:
    cfg = compose_cfg([f"importance={importance}", "debug=fast"], tmp_path)
    assert cfg.callbacks.control_pruning.importance == importance
    built = train.find_pruning_callback(train.instantiate_callbacks(cfg)).importance.name
    assert built == ("trajectory" if importance == "auto" else importance)  # auto: the trajectory at a target
    if importance == "auto":  # ... and Taylor with a quality budget
        cfg = compose_cfg(["importance=auto", "controller=lqr", "pruning.quality_budget=0.01", "debug=fast"], tmp_path)
        assert train.find_pruning_callback(train.instantiate_callbacks(cfg)).importance.name == "taylor"


def test_importance_settings_reach_the_criterion(hydra_init: None, tmp_path: Path) -> None:
    """``importance.kwargs`` is passed to the criterion's constructor (Taylor's EMA factor; a bad one is refused)."""
    for beta in (0.9, 0.5):
        cfg = compose_cfg(["importance=taylor", f"importance.kwargs.beta={beta}", "debug=fast"], tmp_path)
        assert train.find_pruning_callback(train.instantiate_callbacks(cfg)).importance.beta == beta
    cfg = compose_cfg(["importance=taylor", "importance.kwargs.beta=1.5", "debug=fast"], tmp_path)
    with pytest.raises(Exception, match=r"beta=1.5 must lie in \[0, 1\)"):
        train.instantiate_callbacks(cfg)
    cfg = compose_cfg(["importance=trajectory", "+importance.kwargs.beta=0.5", "debug=fast"], tmp_path)
    with pytest.raises(Exception, match=r"argument\(s\) \['beta'\] for importance 'trajectory'. Allowed: \(none\)"):
        train.instantiate_callbacks(cfg)


def test_fast_debug_stack_instantiates(hydra_init: None, tmp_path: Path) -> None:
    import lightning as L

    cfg = compose_cfg(["debug=fast"], tmp_path)
    dm = train.instantiate_datamodule(cfg)
    model = train.instantiate_model(cfg, dm)
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert linears[0].in_features == 32 and linears[-1].out_features == 10  # derived from the data
    loggers = train.instantiate_loggers(cfg)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    trainer = instantiate(cfg.trainer, callbacks=train.instantiate_callbacks(cfg), logger=loggers)
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == 2


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate_without_network(hydra_init: None, tmp_path: Path, logger: str) -> None:
    cfg = compose_cfg([f"logger={logger}"], tmp_path)
    loggers = train.instantiate_loggers(cfg)  # WandbLogger starts no run until .experiment is used
    assert len(loggers) == len(cfg.logger)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainers_instantiate(hydra_init: None, tmp_path: Path, trainer: str) -> None:
    cfg = compose_cfg([f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator == "gpu":  # CPU-only CI: check the composed values, don't build it
        expected = {"gpu": (1, None), "ddp_gpu": ("auto", "ctprune_ddp")}[trainer]
        assert (cfg.trainer.devices, cfg.trainer.get("strategy")) == expected and cfg.trainer.max_epochs == 8
        return
    built = instantiate(cfg.trainer, logger=False)
    assert built.max_epochs == 8
    strategy = {"ddp": PruningDDPStrategy, "fsdp": PruningFSDPStrategy}.get(trainer)
    if strategy is not None:  # the pruning strategies, two CPU processes (not launched here)
        assert isinstance(built.strategy, strategy) and built.num_devices == 2


def test_dataset_options_instantiate(hydra_init: None, tmp_path: Path) -> None:
    for name in options("dataset"):
        dm = train.instantiate_datamodule(compose_cfg([f"dataset={name}"], tmp_path))
        if name == "shakespeare":  # characters: the vocabulary is read from the texts on first use
            assert dm.block_size == 128 and dm.input_shape == (128,)
            continue
        assert dm.num_classes == 10 and len(dm.input_shape) >= 1


def test_default_model_is_784_1024_1024_10(hydra_init: None, tmp_path: Path) -> None:
    cfg = compose_cfg([], tmp_path)
    dm = train.instantiate_datamodule(cfg)
    model = train.instantiate_model(cfg, dm)
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1024), (1024, 1024), (1024, 10)]


def test_unknown_controller_names_the_options(hydra_init: None) -> None:
    with pytest.raises(HydraException) as err:
        compose("train", overrides=["controller=foo"])
    msg = str(err.value)
    assert "foo" in msg
    for name in CONTROLLERS:
        assert name in msg


def test_out_of_range_target_raises_value_error(hydra_init: None, tmp_path: Path) -> None:
    cfg = compose_cfg(["pruning.target=1.5"], tmp_path)
    with pytest.raises(Exception, match="1.5"):
        instantiate(cfg.controller)


def test_wandb_gets_the_control_trace_as_a_table_with_the_reasons(hydra_init: None, tmp_path: Path) -> None:
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    (wandb_logger,) = train.instantiate_loggers(cfg)
    trace = [{"step": 10, "compute": 0.9, "action": 0.1, "requested": 0.1, "damage": 0.0, "damage_std": 0.001,
              "final_damage": 0.002, "final_std": 0.001, "reference": 1.5, "rho": 1.0, "budget": 0.01, "reason": ""},
             {"step": 20, "compute": 0.9, "action": 0.0, "requested": 0.0, "damage": 0.008, "damage_std": 0.001,
              "final_damage": 0.008, "final_std": 0.002, "reference": 1.4, "rho": 1.0, "budget": 0.01,
              "reason": "budget: predicted final damage 0.0080 + 2σ (0.0020) >= 0.01"}]
    train.log_summary([wandb_logger], {"train_flops_saved": 0.1, "trace": trace}, step=20)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()
    (table,) = run_dir.rglob("trace_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == list(train.TRACE_COLUMNS)
    assert [row[0] for row in data["data"]] == [10, 20] and data["data"][1][-1].startswith("budget:")


@pytest.mark.parametrize("controller", ["lqr", "pid"])
def test_pruning_grow_reaches_the_budget_mode(hydra_init: None, tmp_path: Path, controller: str) -> None:
    cfg = compose_cfg([f"controller={controller}", "debug=fast", "pruning.quality_budget=0.02"], tmp_path)
    assert cfg.pruning.grow is False and instantiate(cfg.controller).mode.grow is False  # off by default
    cfg = compose_cfg([f"controller={controller}", "debug=fast", "pruning.quality_budget=0.02", "pruning.grow=true",
                       "controller.grow_hold=5"], tmp_path)
    ctrl = instantiate(cfg.controller)
    assert ctrl.mode.grow is True and ctrl.mode.grow_hold == 5


def test_every_budget_setting_round_trips_through_hydra_and_the_callback(hydra_init: None, tmp_path: Path) -> None:
    """Each budget-mode setting of the lqr family set from the command line reaches the controller the callback
    runs (none dropped once a budget is set), and its state survives a state_dict round trip mid-run."""
    overrides = ["controller=lqr", "debug=fast", "pruning.quality_budget=0.02", "controller.margin=1.5",
                 "controller.warmup=0.2", "controller.max_rate=3.0", "controller.slack_q=2.0", "controller.slack_r=0.5",
                 "controller.u_max=0.07"]
    cfg = compose_cfg(overrides, tmp_path)
    callback = instantiate(cfg.callbacks.control_pruning, _convert_="all")
    ctrl = callback.controller
    assert (ctrl.budget, ctrl.mode.margin, ctrl.mode.warmup, ctrl.mode.max_rate) == (0.02, 1.5, 0.2, 3.0)
    assert (ctrl.slack_q, ctrl.slack_r, ctrl.u_max) == (2.0, 0.5, 0.07)
    from ctprune_lightning.controllers import Observation

    obs = Observation(step=50, progress=0.25, compute=0.9, damage=0.0, final_damage=0.004, final_std=0.001,
                      next_factor=0.6, next_factor_std=0.2, last_action=0.05)
    ctrl.step(obs)
    clone = instantiate(compose_cfg(overrides, tmp_path).controller)
    clone.load_state_dict(ctrl.state_dict())
    later = Observation(step=60, progress=0.3, compute=0.85, damage=0.0, final_damage=0.005, final_std=0.001,
                        next_factor=0.6, next_factor_std=0.2)
    assert clone.step(later) == ctrl.step(later) and clone.max_jump == ctrl.max_jump and clone.cuts == ctrl.cuts == 1


def test_cost_settings_round_trip_through_hydra_to_the_callback(hydra_init: None, tmp_path: Path) -> None:
    """pruning.cost / cost_model / cost_kwargs and round_to=auto reach the loop the callback runs; bad values
    stop with a message naming the allowed ones."""
    cfg = compose_cfg(["debug=fast"], tmp_path)
    assert (cfg.pruning.cost, cfg.pruning.cost_model, dict(cfg.pruning.cost_kwargs)) == ("flops", None, {})
    loop = train.find_pruning_callback(train.instantiate_callbacks(cfg)).loop
    assert (loop.cost, loop.cost_kwargs, loop.round_to) == ("flops", None, 1)
    cfg = compose_cfg(["debug=fast", "pruning.cost=time", "pruning.round_to=auto",
                       "+pruning.cost_kwargs.max_seconds=1.5"], tmp_path)
    loop = train.find_pruning_callback(train.instantiate_callbacks(cfg)).loop
    assert (loop.cost, loop.round_to) == ("time", "auto") and dict(loop.cost_kwargs) == {"max_seconds": 1.5}
    cfg = compose_cfg(["debug=fast", "pruning.cost_model=true"], tmp_path)
    assert train.find_pruning_callback(train.instantiate_callbacks(cfg)).loop.cost_kwargs == {}
    for override, message in (("pruning.cost=watts", "must be one of flops, time, got 'watts'"),
                              ("pruning.round_to=fast", "must be an integer >= 1 or 'auto', got 'fast'")):
        with pytest.raises(Exception, match=message):
            train.instantiate_callbacks(compose_cfg(["debug=fast", override], tmp_path))


def test_persistence_prior_reaches_the_budget_sensor(hydra_init: None, tmp_path: Path) -> None:
    """pruning.persistence_prior (all or some keys) reaches the DamageSensor the loop builds for a budget; an
    unknown key or a bad value stops at construction with the key and the allowed ones named."""
    from ctprune_lightning.sensing import PERSISTENCE_PRIOR

    cfg = compose_cfg(["controller=lqr", "debug=fast", "pruning.quality_budget=0.02"], tmp_path)
    assert dict(cfg.pruning.persistence_prior) == PERSISTENCE_PRIOR
    cfg = compose_cfg(["controller=lqr", "debug=fast", "pruning.quality_budget=0.02",
                       "pruning.persistence_prior.mean=0.2", "pruning.persistence_prior.std=0.3"], tmp_path)
    loop = train.find_pruning_callback(train.instantiate_callbacks(cfg)).loop
    loop.start_budget(total_steps=400, interval=20)
    sensor = loop.estimator
    assert (sensor.rho_mean, sensor.rho_mean_std, sensor.rho_spread) == (0.2, 0.3, PERSISTENCE_PRIOR["spread"])
    assert sensor.estimate(0)["next_factor"] == pytest.approx(0.2)  # no reading yet: the prior itself
    for override, message in (("+pruning.persistence_prior.median=0.2",
                               r"unknown key\(s\) \['median'\]; allowed: mean, std, spread"),
                              ("pruning.persistence_prior.std=0", r"persistence_prior.std must be a number > 0, got 0")):
        with pytest.raises(Exception, match=message):
            train.instantiate_callbacks(compose_cfg(["controller=lqr", "debug=fast", override], tmp_path))
