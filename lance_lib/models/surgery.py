"""Model surgery for fine-tuning: the classifier, the last N layers, freezing, splitting.

LANCE fine-tunes "the last N convolutional layers" of a pretrained network on new
classes (Sec. 3.1 and Appendix A.1): the classifier is replaced
(:func:`replace_classifier`), the last ``N`` convolutions are chosen
(:func:`last_n_convs`), every other parameter and every BatchNorm's statistics are
frozen (:func:`freeze_for_finetuning`), and the network is cut into a frozen prefix and
a trainable tail (:func:`split_at`) so the prefix can be computed once per image.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Sequence

import torchvision
from torch import nn

from lance_lib.models.cl_networks import MultiHead

__all__ = [
    "classifier_name",
    "freeze_batchnorm",
    "freeze_for_finetuning",
    "last_n_convs",
    "last_n_layers",
    "replace_classifier",
    "set_submodule",
    "split_at",
]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (in place).

    ``name`` is as in ``model.named_modules()``; its parent must exist.  Unlike
    ``nn.Module.set_submodule`` of older PyTorch releases, the target may be a module
    of another type (a LANCE layer for a Conv2d, a lean companion for a ReLU).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
