"""Model builders, layer selection and freezing for LANCE experiments.

Single-task fine-tuning (Appendix A.1 of LANCE) uses ResNet18, ResNet34, MobileNetV2 and
MCUNet; continual learning (Appendix A.2) uses the AlexNet-like network of HAT/GPM and
GPM's reduced ResNet18, both with one classifier head per task.

MCUNet's searched architecture (Lin et al., 2020) is distributed only as a downloadable
configuration, so it is not rebuilt here: ``mcunet`` builds a MobileNetV2 with width
multiplier 0.35, one of the MCU-class backbones of the same authors' tiny-training work
(Lin et al., 2022), and marks it with ``model.stand_in`` so every output can say so.

References
----------
.. [1] Lin et al., "MCUNet: Tiny Deep Learning on IoT Devices", NeurIPS 2020.
.. [2] Lin et al., "On-Device Training Under 256KB Memory", NeurIPS 2022.
.. [3] Saha et al., "Gradient Projection Memory for Continual Learning", ICLR 2021.
.. [4] Serra et al., "Overcoming Catastrophic Forgetting with Hard Attention to the Task",
   ICML 2018.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .vit import vit_tiny

__all__ = [
    "MCUNET_STAND_IN",
    "MODEL_INFO",
    "ModelInfo",
    "MultiHead",
    "alexnet_cl",
    "build_model",
    "classifier_name",
    "freeze_batchnorm",
    "freeze_for_finetuning",
    "last_n_convs",
    "last_n_layers",
    "mcunet",
    "mobilenet_v2",
    "reduced_resnet18_cl",
    "replace_classifier",
    "resnet18",
    "resnet34",
    "split_at",
]

MCUNET_STAND_IN = "MobileNetV2-0.35 stand-in for MCUNet"

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ModelInfo(TypedDict):
    """Static description of a registered model.

    Keys are ``native_resolution`` (input side length in pixels the architecture is
    meant for), ``label`` (human-readable name for tables and figures) and ``stand_in``
    (``None``, or a sentence saying which network replaces the paper's).
    """

    native_resolution: int
    label: str
    stand_in: str | None


MODEL_INFO: dict[str, ModelInfo] = {
    "resnet18": {"native_resolution": 224, "label": "ResNet18", "stand_in": None},
    "resnet34": {"native_resolution": 224, "label": "ResNet34", "stand_in": None},
    "mobilenet_v2": {"native_resolution": 224, "label": "MobileNetV2", "stand_in": None},
    # 128 px is the input of the MCU models in tiny-training [2] (image_size: 128).
    "mcunet": {
        "native_resolution": 128,
        "label": "MCU-class (MobileNetV2-0.35 stand-in)",
        "stand_in": MCUNET_STAND_IN,
    },
    "alexnet_cl": {"native_resolution": 32, "label": "AlexNet (5-layer, CL)", "stand_in": None},
    # 32 px for 5-Datasets; Split miniImageNet uses 84 px with first_stride=2.
    "reduced_resnet18_cl": {
        "native_resolution": 32,
        "label": "Reduced ResNet18 (CL)",
        "stand_in": None,
    },
    # the transformer companion (issue 7): a pre-norm ViT for 32 px inputs
    "vit_tiny": {"native_resolution": 32, "label": "ViT-Tiny (pre-norm)", "stand_in": None},
}


# --------------------------------------------------------------------------------------
# Single-task (ImageNet-style) models
# --------------------------------------------------------------------------------------


def _torchvision_model(
    builder: Callable[..., nn.Module], num_classes: int, weights: str | None, **kwargs
) -> nn.Module:
    if weights is None:
        return builder(weights=None, num_classes=num_classes, **kwargs)
    model = builder(weights=weights, **kwargs)
    return replace_classifier(model, num_classes)


def resnet18(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Torchvision ResNet18.

    Parameters
    ----------
    num_classes : int
        Output classes of the (new) classifier.
    weights : str, optional
        Torchvision weight name such as ``"IMAGENET1K_V1"`` (needs a network or a
        filled torch hub cache). The classifier is replaced after loading.
    **kwargs
        Passed to :func:`torchvision.models.resnet18`.

    Returns
    -------
    torchvision.models.ResNet
    """
    return _torchvision_model(torchvision.models.resnet18, num_classes, weights, **kwargs)


def resnet34(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Torchvision ResNet34; parameters as in :func:`resnet18`."""
    return _torchvision_model(torchvision.models.resnet34, num_classes, weights, **kwargs)


def mobilenet_v2(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Torchvision MobileNetV2 (width 1.0); parameters as in :func:`resnet18`."""
    return _torchvision_model(torchvision.models.mobilenet_v2, num_classes, weights, **kwargs)


def mcunet(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """MCU-class network: MobileNetV2 with width multiplier 0.35 standing in for MCUNet.

    Parameters
    ----------
    num_classes : int
        Output classes.
    weights : None
        No pretrained weights exist offline for this stand-in; anything else raises.
    **kwargs
        Passed to :class:`torchvision.models.MobileNetV2` (``width_mult`` is fixed).

    Returns
    -------
    torchvision.models.MobileNetV2
        Carries ``stand_in = MCUNET_STAND_IN``.

    Notes
    -----
    MCUNet's per-block configuration ("mcunet-in3", "mcunet-5fps") is published only as
    a downloadable file, so it is not reproduced. MobileNetV2-0.35 is one of the
    MCU-class backbones of tiny-training [2]; its native resolution is taken as 128.
    """
    if weights is not None:
        raise ValueError(f"no pretrained weights available for the {MCUNET_STAND_IN}")
    model = torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=0.35, **kwargs)
    model.stand_in = MCUNET_STAND_IN
    return model


# --------------------------------------------------------------------------------------
# Continual-learning models (Appendix A.2)
# --------------------------------------------------------------------------------------


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
    Heads have no bias, as in GPM [3].
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
    """Backbone of the 5-layer AlexNet of HAT [4] / GPM [3] (heads live in MultiHead).

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
    Exactly GPM's ``AlexNet`` [3]: convolutions 64/128/256 with kernels 4/3/2, no
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


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mobilenet_v2": mobilenet_v2,
    "mcunet": mcunet,
    "vit_tiny": vit_tiny,
}


def build_model(name: str, num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model by name.

    Parameters
    ----------
    name : str
        A key of :data:`MODEL_INFO`.
    num_classes : int
        Classifier outputs; for the continual-learning models (``alexnet_cl``,
        ``reduced_resnet18_cl``) the outputs of each task head.
    weights : str, optional
        Torchvision weight name for the ImageNet models (see :func:`resnet18`).
    **kwargs
        Passed to the builder. The continual-learning models require ``num_tasks``.

    Returns
    -------
    nn.Module
    """
    if name in ("alexnet_cl", "reduced_resnet18_cl"):
        if weights is not None:
            raise ValueError(f"{name} has no pretrained weights")
        builder = alexnet_cl if name == "alexnet_cl" else reduced_resnet18_cl
        return builder(classes_per_task=num_classes, **kwargs)
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_INFO)}")
    return _BUILDERS[name](num_classes, weights=weights, **kwargs)


def classifier_name(model: nn.Module) -> str:
    """Name of the classifier module: ``fc``, ``classifier.<i>`` or ``heads``.

    Parameters
    ----------
    model : nn.Module
        A torchvision ResNet / MobileNetV2 (or the MCUNet stand-in) or a MultiHead.

    Returns
    -------
    str
        A name from ``model.named_modules()``.
    """
    if isinstance(model, MultiHead):
        return "heads"
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return "classifier"
    if isinstance(classifier, nn.Sequential):
        linear = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
        if linear:
            return f"classifier.{linear[-1]}"
    raise TypeError(f"cannot find the classifier of {type(model).__name__}")


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a freshly initialized classifier with ``num_classes`` outputs (in place).

    Parameters
    ----------
    model : nn.Module
        A torchvision ResNet / MobileNetV2 or the MCUNet stand-in.
    num_classes : int
        Outputs of the new head.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Notes
    -----
    The new head is initialized as torchvision initializes the architecture's own:
    PyTorch's default for ResNet's ``fc``, N(0, 0.01) weights and zero bias for
    MobileNetV2. It lands on the device and dtype of the head it replaces; the
    random draw uses the global torch generator.
    """
    name = classifier_name(model)
    if name == "heads":
        raise TypeError("MultiHead models keep one head per task; build a new MultiHead")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(model, torchvision.models.MobileNetV2):
        nn.init.normal_(new.weight, 0.0, 0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    setattr(parent, child, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


# --------------------------------------------------------------------------------------
# Layer selection and freezing
# --------------------------------------------------------------------------------------


def last_n_layers(
    model: nn.Module,
    n: int,
    types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
) -> list[tuple[str, nn.Module]]:
    """The last ``n`` modules of the given types, in ``model.named_modules()`` order.

    Parameters
    ----------
    model : nn.Module
        Any model.
    n : int
        How many layers, at least 1.
    types : tuple of type
        Module classes that count as layers.

    Returns
    -------
    list of (str, nn.Module)
        Qualified names and modules, earliest first.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
    if not 1 <= n <= len(layers):
        raise ValueError(f"n={n} but the model has {len(layers)} layers of types {types}")
    return layers[-n:]


def last_n_convs(model: nn.Module, n: int) -> list[tuple[str, nn.Conv2d]]:
    """The last ``n`` ``Conv2d`` modules in ``model.named_modules()`` order.

    Parameters
    ----------
    model : nn.Module
        Any model.
    n : int
        Number of convolutions ("the last N convolutional layers" of LANCE Sec. 3.1).

    Returns
    -------
    list of (str, nn.Conv2d)
        Earliest first.

    Notes
    -----
    Every ``Conv2d`` counts, as in the published fine-tuning baselines: the 1 x 1
    downsample convolutions of ResNet and MobileNetV2's depthwise convolutions. For a
    torchvision ResNet18 the last four are ``layer4.0.conv2``,
    ``layer4.0.downsample.0``, ``layer4.1.conv1`` and ``layer4.1.conv2``.
    """
    return last_n_layers(model, n, (nn.Conv2d,))


def _keep_batchnorm_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def _train_keeping_batchnorm_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    for m in self.modules():
        if isinstance(m, _BATCHNORM):
            m.eval()
    return self


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in evaluation mode and keep it there (in place).

    Parameters
    ----------
    model : nn.Module
        Any model.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Notes
    -----
    Two mechanisms, so that neither ``model.train()`` nor ``submodule.train()`` can
    bring batch statistics back: ``model.train`` is overridden on this instance to
    re-apply ``eval()`` to the BatchNorms (so their ``training`` flag reads
    ``False``), and each BatchNorm gets a forward pre-hook that sets
    ``training = False`` before every call. Running statistics are then used and never
    updated. BatchNorms built with ``track_running_stats=False`` (the GPM models)
    have no running statistics and keep normalizing with batch statistics.
    Parameters' ``requires_grad`` is left unchanged.
    """
    for m in model.modules():
        if isinstance(m, _BATCHNORM):
            if not getattr(m, "_lance_eval_hook", False):
                m.register_forward_pre_hook(_keep_batchnorm_eval)
                m._lance_eval_hook = True
            m.eval()
    model.train = types.MethodType(_train_keeping_batchnorm_eval, model)
    return model


def freeze_for_finetuning(
    model: nn.Module,
    trainable: Sequence[str] | int,
    *,
    train_classifier: bool = True,
) -> list[str]:
    """Make exactly the chosen modules trainable and freeze BatchNorm statistics.

    Parameters
    ----------
    model : nn.Module
        Model to prepare, modified in place.
    trainable : sequence of str or int
        Module names from ``model.named_modules()`` whose parameters train, or ``n``
        for the last ``n`` convolutions (:func:`last_n_convs`).
    train_classifier : bool
        Also train the classifier (:func:`classifier_name`). Default ``True``: LANCE
        fine-tunes "the last N convolutional layers" on new classes, whose freshly
        initialized head (:func:`replace_classifier`) must be learned too.

    Returns
    -------
    list of str
        Names of the parameters left with ``requires_grad=True``, in
        ``named_parameters()`` order.

    Notes
    -----
    All other parameters get ``requires_grad=False``. Every BatchNorm is put in
    evaluation mode for good (:func:`freeze_batchnorm`); a BatchNorm inside a named
    module keeps trainable affine parameters but uses running statistics.
    """
    if isinstance(trainable, int):
        names = [name for name, _ in last_n_convs(model, trainable)]
    else:
        names = list(trainable)
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise KeyError(f"no such modules: {unknown}")
    if train_classifier:
        names.append(classifier_name(model))
    model.requires_grad_(False)
    for name in names:
        modules[name].requires_grad_(True)
    freeze_batchnorm(model)
    return [name for name, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------
# Frozen prefix / trainable tail
# --------------------------------------------------------------------------------------


def _block_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's forward pass as a flat list of top-level blocks."""
    if isinstance(model, torchvision.models.ResNet):
        units = [(name, getattr(model, name)) for name in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(model, stage))]
        return units + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]
    if isinstance(model, torchvision.models.MobileNetV2):
        units = [(f"features.{i}", block) for i, block in enumerate(model.features)]
        return units + [
            ("avgpool", nn.AdaptiveAvgPool2d((1, 1))),
            ("flatten", nn.Flatten(1)),
            ("classifier", model.classifier),
        ]
    raise TypeError(f"split_at supports torchvision ResNet and MobileNetV2, not {type(model)}")


def split_at(model: nn.Module, first_trainable: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a ResNet / MobileNetV2 into a frozen prefix and a trainable tail.

    Parameters
    ----------
    model : nn.Module
        A torchvision ResNet18/34, MobileNetV2 or the MCUNet stand-in.
    first_trainable : str
        Name of the earliest trainable module, e.g. ``"layer4.0.conv2"``, or of a
        block or stage (``"layer4"``).

    Returns
    -------
    prefix, tail : nn.Sequential
        ``prefix`` runs every top-level block before the one containing
        ``first_trainable``; ``tail`` runs that block and the rest, including pooling,
        flattening and the classifier. ``tail(prefix(x))`` equals ``model(x)``.

    Notes
    -----
    Blocks are ResNet's stem layers and residual blocks (``layer4.0``) and the entries
    of MobileNetV2's ``features``. The pieces share their modules with ``model``
    (training the tail trains the model); Sequential names use ``_`` for ``.``.
    With BatchNorm in evaluation mode and the prefix frozen, ``prefix(x)`` depends on
    the image only and can be computed once and cached.
    """
    if first_trainable not in dict(model.named_modules()):
        raise KeyError(f"no module named {first_trainable!r}")
    units = _block_units(model)
    starts = [
        index
        for index, (name, _) in enumerate(units)
        if first_trainable == name
        or first_trainable.startswith(name + ".")
        or name.startswith(first_trainable + ".")
    ]
    if not starts:
        raise ValueError(f"{first_trainable!r} is not inside a top-level block of the model")
    index = starts[0]

    def sequential(part: list[tuple[str, nn.Module]]) -> nn.Sequential:
        return nn.Sequential(OrderedDict((name.replace(".", "_"), m) for name, m in part))

    return sequential(units[:index]), sequential(units[index:])
