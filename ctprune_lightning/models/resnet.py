"""A CIFAR-style ResNet (ResNet-20 family) adapted to 28×28 grayscale, as a LightningModule.

3 stages × ``n`` basic blocks (depth = 6n + 2), 16/32/64 channels, BatchNorm, stride-2 at the start of
stages 2 and 3, option-B shortcuts (1×1 conv + BN where the shape changes, identity elsewhere), global
average pooling, one Linear. Channels tied by the residual additions form one prunable group per stage.

Example::

    model = ResNetClassifier(depth=20, num_classes=10, in_channels=1)
    lightning.Trainer(max_epochs=8).fit(model, datamodule=FashionMNISTDataModule())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctprune_lightning.models.classifier import ClassifierModule
from ctprune_lightning.models.common import check_optim_args, configure_optimizer_and_scheduler, decay_groups


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem (conv3×3-BN-ReLU) -> stage1..3 -> global average pool -> Linear."""

    def __init__(self, depth: int = 20, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth={depth} must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, planes = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(planes if j == 0 else w, w, stride=2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            planes = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNetClassifier(ClassifierModule):
    """ResNet-(6n+2) classifier; logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/*``.

    ``channels_last``: the convolutions' weights and inputs in NHWC (oneDNN's and the tensor cores' layout).
    """

    def __init__(self, depth: int = 20, widths: Sequence[int] = (16, 32, 64), num_classes: int = 10,
                 in_channels: int = 1, image_size: int = 28, optimizer: str = "adamw", lr: float = 2e-3,
                 weight_decay: float = 5e-4, momentum: float = 0.9, scheduler: str = "cosine",
                 warmup_steps: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        check_optim_args(optimizer, scheduler, lr, warmup_steps)
        widths = [int(w) for w in widths]
        if len(widths) != 3 or any(w < 1 for w in widths) or int(num_classes) < 2 or int(in_channels) < 1:
            raise ValueError(f"need 3 stage widths >= 1, num_classes >= 2, in_channels >= 1; got "
                             f"{widths=}, {num_classes=}, {in_channels=}")
        self.save_hyperparameters()
        self.net = ResNet(int(depth), widths, int(num_classes), int(in_channels))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)  # surgery keeps it (ctprune_lightning.surgery.optim)
        self.init_metrics(int(num_classes))
        self.example_input_array = torch.zeros(2, int(in_channels), int(image_size), int(image_size))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) for images (B, C, H, W); (B, H*W) inputs are reshaped when C = 1."""
        if x.dim() == 2:
            side = int(round(x.shape[1] ** 0.5))
            x = x.view(x.shape[0], 1, side, side)
        return self.net(x.contiguous(memory_format=self.memory_format))

    def configure_optimizers(self) -> Any:
        return configure_optimizer_and_scheduler(self, decay_groups(self, self.hparams.weight_decay))
