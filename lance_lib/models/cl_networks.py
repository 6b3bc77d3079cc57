"""The continual-learning networks of Appendix A.2 of LANCE, one head per task.

Continual learning uses the AlexNet-like network of HAT/GPM and GPM's reduced ResNet18,
each a shared backbone under a :class:`MultiHead` (task-incremental learning).

References
----------
.. [1] Saha et al., "Gradient Projection Memory for Continual Learning", ICLR 2021.
.. [2] Serra et al., "Overcoming Catastrophic Forgetting with Hard Attention to the Task",
   ICML 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.models.registry import register_model

__all__ = [
    "AlexNetCL",
    "BasicBlockCL",
    "MultiHead",
    "ReducedResNet18CL",
    "alexnet_cl",
    "reduced_resnet18_cl",
]


class MultiHead(nn.Module):
    """A shared backbone with one linear head per task (task-incremental learning).

    Parameters
    ----------
    backbone : nn.Module
        Maps images to features; its output is flattened to ``(batch, feature_dim)``.
    feature_dim : int
        Number of features the backbone produces.
    num_tasks : int
        Number of heads.
    classes_per_task : int
        Outputs of each head.

    Notes
    -----
    Heads have no bias, as in GPM [1].
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_tasks: int, classes_per_task: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_tasks = num_tasks
        self.classes_per_task = classes_per_task
        self.heads = nn.ModuleList(
            nn.Linear(feature_dim, classes_per_task, bias=False) for _ in range(num_tasks)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, shape ``(batch, feature_dim)``."""
        return torch.flatten(self.backbone(x), 1)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of head ``task``, shape ``(batch, classes_per_task)``."""
        return self.heads[task](self.features(x))


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class AlexNetCL(nn.Module):
    """Backbone of the 5-layer AlexNet of HAT [2] / GPM [1] (heads live in MultiHead).

    Parameters
    ----------
    input_size : int
        Side of the square input image (32 for Split CIFAR-100).
    track_running_stats : bool
        Passed to every BatchNorm; ``False`` (GPM) normalizes with batch statistics
        in both training and evaluation mode.
    """

    def __init__(self, input_size: int = 32, track_running_stats: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 4, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(128, track_running_stats=track_running_stats)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.bn3 = nn.BatchNorm2d(256, track_running_stats=track_running_stats)
        side = input_size
        for kernel in (4, 3, 2):
            side = _conv_out(side, kernel) // 2
        self.fc1 = nn.Linear(256 * side * side, 2048, bias=False)
        self.bn4 = nn.BatchNorm1d(2048, track_running_stats=track_running_stats)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.bn5 = nn.BatchNorm1d(2048, track_running_stats=track_running_stats)
        self.maxpool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features after ``fc2``, shape ``(batch, 2048)``."""
        x = self.maxpool(self.drop1(self.relu(self.bn1(self.conv1(x)))))
        x = self.maxpool(self.drop1(self.relu(self.bn2(self.conv2(x)))))
        x = self.maxpool(self.drop2(self.relu(self.bn3(self.conv3(x)))))
        x = torch.flatten(x, 1)
        x = self.drop2(self.relu(self.bn4(self.fc1(x))))
        return self.drop2(self.relu(self.bn5(self.fc2(x))))


@register_model(label="AlexNet (5-layer, CL)", native_resolution=32, kind="multi_head")
def alexnet_cl(
    num_tasks: int,
    classes_per_task: int,
    *,
    input_size: int = 32,
    track_running_stats: bool = False,
) -> MultiHead:
    """AlexNet-like multi-head network for Split CIFAR-100 (Appendix A.2 of LANCE).

    Parameters
    ----------
    num_tasks, classes_per_task : int
        Number of heads and outputs per head.
    input_size : int
        Square input side; 32 gives a 256 x 2 x 2 map before ``fc1``.
    track_running_stats : bool
        BatchNorm mode, see Notes.

    Returns
    -------
    MultiHead
        Backbone :class:`AlexNetCL` with feature dimension 2048.

    Notes
    -----
    Exactly GPM's ``AlexNet`` [1]: convolutions 64/128/256 with kernels 4/3/2, no
    padding, no bias, each followed by BatchNorm, ReLU, dropout and 2 x 2 max-pooling
    (dropout 0.2 after the first two, 0.5 after the third and after each of the two
    2048-unit bias-free fully connected layers, which also carry BatchNorm1d).
    BatchNorm uses ``track_running_stats=False`` by default as GPM does, so even in
    ``eval()`` mode it normalizes with the statistics of the current batch.
    """
    backbone = AlexNetCL(input_size, track_running_stats)
    return MultiHead(backbone, 2048, num_tasks, classes_per_task)


class BasicBlockCL(nn.Module):
    """GPM's ResNet basic block (shortcut named ``shortcut``, functional ReLU)."""

    def __init__(self, in_planes: int, planes: int, stride: int, track_running_stats: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, track_running_stats=track_running_stats),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18CL(nn.Module):
    """Backbone of GPM's reduced ResNet18 (BasicBlock, [2, 2, 2, 2], ``nf`` base filters).

    Parameters
    ----------
    nf : int
        Base width; stages have ``nf, 2nf, 4nf, 8nf`` channels.
    first_stride : int
        Stride of the 3 x 3 stem convolution.
    track_running_stats : bool
        Passed to every BatchNorm.
    """

    def __init__(
        self, nf: int = 20, first_stride: int = 1, track_running_stats: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, nf, 3, stride=first_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf, track_running_stats=track_running_stats)
        in_planes = nf
        for index, (planes, stride) in enumerate(
            [(nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)], start=1
        ):
            blocks = []
            for block_stride in (stride, 1):
                blocks.append(BasicBlockCL(in_planes, planes, block_stride, track_running_stats))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features after a 2 x 2 average pooling, flattened."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.avg_pool2d(out, 2), 1)


# 32 px for 5-Datasets; Split miniImageNet uses 84 px with first_stride=2.
@register_model(label="Reduced ResNet18 (CL)", native_resolution=32, kind="multi_head")
def reduced_resnet18_cl(
    num_tasks: int,
    classes_per_task: int,
    nf: int = 20,
    first_stride: int = 1,
    *,
    input_size: int | None = None,
    track_running_stats: bool = False,
) -> MultiHead:
    """Reduced ResNet18 for Split miniImageNet and 5-Datasets (Appendix A.2 of LANCE).

    Parameters
    ----------
    num_tasks, classes_per_task : int
        Number of heads and outputs per head.
    nf : int
        Base number of filters (20 in GPM).
    first_stride : int
        Stride of the stem convolution: 2 for Split miniImageNet (84 x 84), 1 for
        5-Datasets (32 x 32).
    input_size : int, optional
        Square input side; defaults to 32 for ``first_stride=1`` and 84 otherwise. It
        fixes the feature dimension, since the backbone ends in a fixed 2 x 2 average
        pooling as in GPM (not a global one).
    track_running_stats : bool
        BatchNorm mode; ``False`` as in GPM (batch statistics also in ``eval()``).

    Returns
    -------
    MultiHead
        Feature dimension ``8 nf * s * s``: 640 at 32 px / stride 1, 1440 at 84 px /
        stride 2 (GPM's ``nf*8*4`` and ``nf*8*9``).
    """
    if input_size is None:
        input_size = 32 if first_stride == 1 else 84
    side = _conv_out(input_size, 3, first_stride, 1)
    for _ in range(3):  # layer2..layer4 halve the map (3x3 conv, stride 2, padding 1)
        side = _conv_out(side, 3, 2, 1)
    side //= 2
    if side < 1:
        raise ValueError(f"input_size={input_size} is too small for the reduced ResNet18")
    backbone = ReducedResNet18CL(nf, first_stride, track_running_stats)
    return MultiHead(backbone, 8 * nf * side * side, num_tasks, classes_per_task)
