"""Models for LANCE experiments: a registry, the paper's networks, and model surgery.

==================  ===========================================================
``registry``        :func:`register_model`, :data:`MODEL_INFO`, :func:`build_model`
``cnn``             ResNet18/34, MobileNetV2, the MCUNet stand-in (Appendix A.1)
``cl_networks``     :class:`MultiHead`, AlexNet, reduced ResNet18 (Appendix A.2)
``vit``             the pre-norm ViT of the transformer companion
``surgery``         classifier, last N layers, freezing, prefix/tail split
==================  ===========================================================

Importing the package registers every model.
"""

from lance_lib.models.cl_networks import MultiHead, alexnet_cl, reduced_resnet18_cl
from lance_lib.models.cnn import MCUNET_STAND_IN, mcunet, mobilenet_v2, resnet18, resnet34
from lance_lib.models.registry import (
    MODEL_INFO,
    MODEL_KINDS,
    ModelInfo,
    build_model,
    register_model,
)
from lance_lib.models.surgery import (
    classifier_name,
    freeze_batchnorm,
    freeze_for_finetuning,
    last_n_convs,
    last_n_layers,
    replace_classifier,
    set_submodule,
    split_at,
)
from lance_lib.models.vit import vit_tiny

__all__ = [
    "MCUNET_STAND_IN",
    "MODEL_INFO",
    "MODEL_KINDS",
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
    "register_model",
    "replace_classifier",
    "resnet18",
    "resnet34",
    "set_submodule",
    "split_at",
    "vit_tiny",
]
