"""LRU model: the chunked parallel scan, the layer's maths and init, the classifier, the sequence data modules."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ctprune_lightning.data.sequential import (SequentialDigitsDataModule, SequentialFashionMNISTDataModule,
                                               images_to_sequences)
from ctprune_lightning.models.lru import (GLU, LRUBlock, LRUClassifier, LRULayer, _DiagonalScan, diagonal_scan,
                                          sequential_scan)
from ctprune_lightning.surgery.balanced import SSM_PARAM_NAMES


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_log_lam(n: int, gen: torch.Generator, dtype: torch.dtype = torch.complex128, rmin: float = 0.3,
                    rmax: float = 0.999) -> torch.Tensor:
    r = rmin + (rmax - rmin) * torch.rand(n, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.complex(r.log(), phase).to(dtype)


def _reference_layer_output(layer: LRULayer, u: torch.Tensor) -> torch.Tensor:
    """y = Re(C x) + D u with x from the sequential recurrence, written out in complex arithmetic."""
    lam = torch.exp(layer.log_lambda())
    b = torch.exp(layer.gamma_log)[:, None] * torch.complex(layer.B_re, layer.B_im)
    c = torch.complex(layer.C_re, layer.C_im)
    x = sequential_scan(torch.einsum("nh,blh->bln", b, u.to(b.dtype)), lam)
    return torch.einsum("hn,bln->blh", c, x).real + layer.D * u


# ------------------------------------------------------------------------------------------------ scan
@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 70), n=st.integers(1, 5), chunk=st.sampled_from([1, 3, 8, 16]),
       seed=st.integers(0, 2**31 - 1))
def test_scan_equals_the_sequential_recurrence(length: int, n: int, chunk: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(2, length, n, dtype=torch.complex128, generator=gen)
    log_lam = _random_log_lam(n, gen)
    ref = sequential_scan(b, log_lam.exp())
    assert torch.allclose(diagonal_scan(b, log_lam, chunk), ref, rtol=0, atol=1e-12 * ref.abs().max())
    out32 = diagonal_scan(b.to(torch.complex64), log_lam.to(torch.complex64), chunk)
    assert (out32 - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_scan_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    for length, chunk in ((11, 4), (16, 4), (5, 8), (33, 4)):
        b = torch.randn(2, length, 3, dtype=torch.complex128, generator=gen).requires_grad_()
        log_lam = _random_log_lam(3, gen, rmin=0.5, rmax=0.95).requires_grad_()
        assert torch.autograd.gradcheck(lambda b_, l_: _DiagonalScan.apply(b_, l_, chunk), (b, log_lam))


def test_scan_has_no_python_loop_over_time() -> None:
    """The number of dispatched ops grows like log(L), not like L (a loop over 1024 steps would be >1000 ops)."""

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n += 1
            return func(*args, **(kwargs or {}))

    layer = LRULayer(4, 8)
    counts = {}
    for length in (64, 1024):
        u = torch.randn(2, length, 4)
        with CountOps() as mode:
            layer(u).sum().backward()
        counts[length] = mode.n
    assert counts[1024] < 400 and counts[1024] - counts[64] < 100, counts


def test_scan_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        diagonal_scan(torch.zeros(2, 3, 4, dtype=torch.complex64), torch.zeros(3, dtype=torch.complex64))


# ------------------------------------------------------------------------------------------------ layer
def test_layer_init_follows_the_lru_ring_init() -> None:
    torch.manual_seed(0)
    layer = LRULayer(d_model=6, d_state=200, r_min=0.9, r_max=0.999, max_phase=6.28)
    assert layer.state_dim == 200 and layer.d_model == 6
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"nu_log": (200,), "theta_log": (200,), "gamma_log": (200,), "B_re": (200, 6),
                      "B_im": (200, 6), "C_re": (6, 200), "C_im": (6, 200), "D": (6,)}
    mod = torch.exp(layer.log_lambda()).abs().detach()
    assert 0.9 - 1e-6 <= float(mod.min()) and float(mod.max()) <= 0.999 + 1e-6
    phase = torch.exp(layer.theta_log.detach())
    assert float(phase.max()) <= 6.28 and float(phase.min()) > 0
    gamma = torch.sqrt(-torch.expm1(-2 * torch.exp(layer.nu_log.double())))  # sqrt(1 - |λ|²)
    assert torch.allclose(torch.exp(layer.gamma_log.double()), gamma, rtol=1e-6)
    assert abs(float(layer.B_re.detach().var()) - 1 / 12) < 0.02 and abs(float(layer.C_re.detach().var()) - 0.005) < 0.002
    with pytest.raises(ValueError, match="r_min"):
        LRULayer(4, 4, r_min=0.99, r_max=0.9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_output_equals_the_written_out_system(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    layer = LRULayer(d_model=5, d_state=7, chunk=4).to(dtype)
    u = torch.randn(3, 21, 5, dtype=dtype)
    ref = _reference_layer_output(layer.double(), u.double())
    out = layer.to(dtype)(u)
    assert out.dtype == dtype and out.shape == (3, 21, 5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


def test_block_structure_and_residual() -> None:
    block = LRUBlock(d_model=8, d_state=4, dropout=0.1)
    assert isinstance(block.norm, torch.nn.BatchNorm1d) and not block.norm.affine
    assert isinstance(block.glu, GLU) and block.drop.p == 0.1
    x = torch.randn(2, 9, 8)
    with torch.no_grad():  # non-trivial running statistics: with the 0/1 defaults the norm is ~ the identity
        block.norm.running_mean.copy_(torch.linspace(-1.0, 1.0, 8))
        block.norm.running_var.copy_(torch.linspace(0.25, 4.0, 8))
    block.eval()
    normed = (x - block.norm.running_mean) / torch.sqrt(block.norm.running_var + block.norm.eps)  # over d_model
    expected = x + block.glu(F.gelu(block.lru(normed)))
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)
    assert isinstance(LRUBlock(8, 4, norm="layernorm").norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm"):
        LRUBlock(8, 4, norm="rmsnorm")


# ------------------------------------------------------------------------------------------------ model
def test_classifier_shapes_groups_and_errors() -> None:
    model = LRUClassifier(input_dim=64, d_input=1, d_model=16, d_state=8, num_blocks=3, num_classes=10)
    assert model.example_input_array.shape == (2, 64, 1)
    assert model(torch.zeros(4, 64, 1)).shape == (4, 10)
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)  # any shape that reads as steps of d_input
    assert model.state_dims == [8, 8, 8]
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["ssm", "main"]
    names = {id(p): n for n, p in model.named_parameters()}
    ssm = {names[id(p)].rsplit(".", 1)[-1] for p in groups[0]["params"]}
    main = {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]}
    assert ssm == set(SSM_PARAM_NAMES) and {"C_re", "C_im", "D", "weight", "bias"} <= main and not ssm & main
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == pytest.approx(1e-3 * 0.5)
    assert groups[1]["weight_decay"] == 0.05 and groups[1]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    clone = LRUClassifier(**model.hparams)
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]
    two = LRUClassifier(input_dim=30, d_input=3, d_model=8, d_state=4, num_blocks=1)
    assert two.example_input_array.shape == (2, 10, 3) and two(torch.zeros(2, 7, 3)).shape == (2, 10)
    for bad in (dict(input_dim=10, d_input=3), dict(scheduler="step"), dict(dropout=1.0), dict(num_blocks=0),
                dict(lr=0.0)):
        with pytest.raises(ValueError):
            LRUClassifier(**bad)
    with pytest.raises(ValueError, match="d_input"):
        two(torch.zeros(2, 10))


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.lrs.append(tuple(g["lr"] for g in trainer.optimizers[0].param_groups))


def test_learns_sequential_digits_logs_all_keys_and_schedules_the_lr() -> None:
    L.seed_everything(0, verbose=False)
    dm = SequentialDigitsDataModule(batch_size=32, seed=0)
    model = LRUClassifier(input_dim=64, d_model=32, d_state=32, num_blocks=1, lr=1e-2, weight_decay=0.0,
                          dropout=0.0, warmup_fraction=0.05)
    lr = _RecordLR()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=3, callbacks=[lr])
    trainer.fit(model, datamodule=dm)
    fit_keys = set(trainer.callback_metrics)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert metrics["val/acc"] > 0.7, metrics  # chance is 0.1; ~0.83 after 3 epochs
    assert {"train/loss", "train/acc", "val/acc", "val/loss"} <= fit_keys
    assert {"test/acc", "test/loss"} <= set(test) and test["test/acc"] > 0.6
    ssm_lr, main_lr = zip(*lr.lrs)
    steps = len(lr.lrs)  # 41 batches x 3 epochs, warm-up 6 steps, then cosine towards 0
    assert steps == 123 and main_lr[0] < main_lr[5] and max(main_lr) == pytest.approx(1e-2, rel=0.01)
    assert main_lr[-1] < 0.01 * max(main_lr) and ssm_lr[10] == pytest.approx(0.5 * main_lr[10])


# ------------------------------------------------------------------------------------------------ data
def test_sequential_digits_split_shapes_and_determinism() -> None:
    dm = SequentialDigitsDataModule(batch_size=50, val_size=200, test_size=300, seed=3)
    assert dm.input_shape == (64, 1) and dm.num_classes == 10 and math.prod(dm.input_shape) == 64
    dm.setup("fit")
    sizes = [len(d) for d in (dm.data_train, dm.data_val, dm.data_test)]
    assert sizes == [1297, 200, 300]
    x_train = dm.data_train.tensors[0]
    assert x_train.shape == (1297, 64, 1) and abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-5
    again = SequentialDigitsDataModule(val_size=200, test_size=300, seed=3)
    again.setup()
    assert torch.equal(again.data_test.tensors[0], dm.data_test.tensors[0])
    other = SequentialDigitsDataModule(val_size=200, test_size=300, seed=4)
    other.setup()
    assert not torch.equal(other.data_test.tensors[1], dm.data_test.tensors[1])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 64, 1) and y.dtype == torch.long
    with pytest.raises(ValueError, match="leaves no training data"):
        SequentialDigitsDataModule(val_size=1000, test_size=1000)


def test_images_to_sequences_pools_then_reads_row_major() -> None:
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert images_to_sequences(img).flatten().tolist() == list(range(16))
    assert images_to_sequences(img, pool=2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_sequential_fashion_mnist_shapes(tmp_path: Path) -> None:
    for pool, steps in ((1, 784), (2, 196), (4, 49)):
        dm = SequentialFashionMNISTDataModule(pool=pool)
        assert dm.input_shape == (steps, 1) and dm.num_classes == 10 and dm.hparams.pool == pool
    with pytest.raises(ValueError, match="pool"):
        SequentialFashionMNISTDataModule(pool=3)
    dm = SequentialFashionMNISTDataModule(pool=4, val_size=100)
    dm.setup("test")  # the real data: setup.sh installs it (a missing install must fail, not skip)
    x = dm.data_test.tensors[0]
    assert x.shape == (10000, 49, 1)
    dm.setup("test")  # idempotent: not pooled twice
    assert dm.data_test.tensors[0].shape == (10000, 49, 1)


@pytest.mark.parametrize(("dataset", "overrides", "steps"),
                         [("digits_seq", [], 64), ("sfmnist", ["dataset.pool=4"], 49)])
def test_hydra_configs_build_the_model_from_the_datamodule(dataset: str, overrides: list[str], steps: int) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import train

    with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=lru", f"dataset={dataset}", "paths.output_dir=.", *overrides])
    with open_dict(cfg):
        cfg.seed = 0
    dm = train.instantiate_datamodule(cfg)
    model = train.instantiate_model(cfg, dm)
    assert isinstance(model, LRUClassifier) and dm.input_shape == (steps, 1)
    assert model.hparams.input_dim == steps and model.example_input_array.shape == (2, steps, 1)
    assert model.state_dims == [128, 128] and model(torch.zeros(2, steps, 1)).shape == (2, 10)
