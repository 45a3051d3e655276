"""Stand-ins for MONAI callables that need packages the node does not install.

``monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor`` (the RetinaNet
feature extractor of the model zoo's ``lung_nodule_ct_detection`` bundle) needs torchvision, which
has no CPU wheel here, for two small things: ``_validate_trainable_layers`` (an argument check) and
``IntermediateLayerGetter`` (runs a backbone's children in order and keeps the outputs of some).
:func:`resnet_fpn_feature_extractor` takes the same arguments and builds the same network (same
modules, same state-dict keys ``body.*`` / ``fpn.*``, same outputs) from MONAI's
``FeaturePyramidNetwork`` and :class:`IntermediateLayers`, so a zoo-form config and its weights load
unchanged: the allow-list (:mod:`models.bundle.allow`) maps the MONAI name to this function.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["IntermediateLayers", "ResNetFPN", "resnet_fpn_feature_extractor", "trainable_layers"]

_MAX_LAYERS = 5
_DEFAULT_PRETRAINED = 3
_FPN_CHANNELS = 256


def trainable_layers(pretrained_backbone: bool, trainable_backbone_layers: int | None) -> int:
    """How many ResNet layers stay trainable: all 5 for a backbone that was not pre-trained (a given value is
    then ignored, with a warning), else the given value or 3; ``ValueError`` outside 0..5."""
    layers = trainable_backbone_layers
    if not pretrained_backbone:
        if layers is not None:
            warnings.warn(f"trainable_backbone_layers={layers} is ignored for a backbone that was not "
                          f"pre-trained: all {_MAX_LAYERS} layers are trainable", stacklevel=2)
        layers = _MAX_LAYERS
    elif layers is None:
        layers = _DEFAULT_PRETRAINED
    if not 0 <= layers <= _MAX_LAYERS:
        raise ValueError(f"trainable_backbone_layers must be in [0, {_MAX_LAYERS}], got {layers}")
    return layers


class IntermediateLayers(nn.ModuleDict):
    """A backbone's children up to the last one named in ``return_layers``, run in order; ``forward`` returns
    ``{return_layers[name]: output}`` of the named ones (torchvision's ``IntermediateLayerGetter``)."""

    def __init__(self, backbone: nn.Module, return_layers: Mapping[str, str]) -> None:
        missing = set(return_layers) - {name for name, _ in backbone.named_children()}
        if missing:
            raise ValueError(f"return_layers {sorted(missing)} are not children of the backbone")
        wanted, kept = set(return_layers), OrderedDict[str, nn.Module]()
        for name, module in backbone.named_children():
            kept[name] = module
            wanted.discard(name)
            if not wanted:
                break
        super().__init__(kept)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class ResNetFPN(nn.Module):
    """A ResNet's intermediate layers (``body``) under a feature pyramid (``fpn``); ``out_channels`` = 256."""

    def __init__(self, body: IntermediateLayers, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = self.fpn(self.body(x))
        return features


def resnet_fpn_feature_extractor(
    backbone: Any,
    spatial_dims: int,
    pretrained_backbone: bool = False,
    returned_layers: Sequence[int] = (1, 2, 3),
    trainable_backbone_layers: int | None = None,
) -> ResNetFPN:
    """MONAI's ``resnet_fpn_feature_extractor`` (same arguments, same network) without torchvision."""
    from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    layers = trainable_layers(pretrained_backbone, trainable_backbone_layers)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:layers] + (["bn1"] if layers == _MAX_LAYERS else [])
    for name, parameter in backbone.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            parameter.requires_grad_(False)
    returned = list(returned_layers)
    if not returned or min(returned) < 1 or max(returned) > 4:
        raise ValueError(f"returned_layers must be in [1, 4], got {returned}")
    stage2 = backbone.in_planes // 8
    fpn = FeaturePyramidNetwork(spatial_dims=spatial_dims, in_channels_list=[stage2 * 2 ** (i - 1) for i in returned],
                                out_channels=_FPN_CHANNELS, extra_blocks=LastLevelMaxPool(spatial_dims))
    body = IntermediateLayers(backbone, {f"layer{k}": str(v) for v, k in enumerate(returned)})
    return ResNetFPN(body, fpn, _FPN_CHANNELS)
