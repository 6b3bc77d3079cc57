"""The paper's single-task CNNs (Appendix A.1 of LANCE), registered by name.

Single-task fine-tuning uses ResNet18, ResNet34, MobileNetV2 and MCUNet. MCUNet's
searched architecture (Lin et al., 2020) is distributed only as a downloadable
configuration, so it is not rebuilt here: ``mcunet`` builds a MobileNetV2 with width
multiplier 0.35, one of the MCU-class backbones of the same authors' tiny-training work
(Lin et al., 2022), and marks it with ``model.stand_in`` so every output can say so.

References
----------
.. [1] Lin et al., "MCUNet: Tiny Deep Learning on IoT Devices", NeurIPS 2020.
.. [2] Lin et al., "On-Device Training Under 256KB Memory", NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from lance_lib.models.registry import register_model
from lance_lib.models.surgery import replace_classifier

__all__ = ["MCUNET_STAND_IN", "mcunet", "mobilenet_v2", "resnet18", "resnet34"]

MCUNET_STAND_IN = "MobileNetV2-0.35 stand-in for MCUNet"


def _torchvision_model(
    builder: Callable[..., nn.Module], num_classes: int, weights: str | None, **kwargs
) -> nn.Module:
    if weights is None:
        return builder(weights=None, num_classes=num_classes, **kwargs)
    model = builder(weights=weights, **kwargs)
    return replace_classifier(model, num_classes)


@register_model(label="ResNet18", native_resolution=224)
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


@register_model(label="ResNet34", native_resolution=224)
def resnet34(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Torchvision ResNet34; parameters as in :func:`resnet18`."""
    return _torchvision_model(torchvision.models.resnet34, num_classes, weights, **kwargs)


@register_model(label="MobileNetV2", native_resolution=224)
def mobilenet_v2(num_classes: int, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Torchvision MobileNetV2 (width 1.0); parameters as in :func:`resnet18`."""
    return _torchvision_model(torchvision.models.mobilenet_v2, num_classes, weights, **kwargs)


# 128 px is the input of the MCU models in tiny-training [2] (image_size: 128).
@register_model(
    label="MCU-class (MobileNetV2-0.35 stand-in)",
    native_resolution=128,
    stand_in=MCUNET_STAND_IN,
)
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
