"""Backbones with a feature pyramid: ResNet-18/50-FPN and MobileNetV3-Large-FPN.

From scratch (the default here, where nothing can be downloaded) every layer trains and uses
ordinary ``BatchNorm2d``: torchvision's ``resnet_fpn_backbone`` defaults to
``FrozenBatchNorm2d``, whose statistics stay those of the random initialisation. With
pretrained weights the torchvision convention holds instead: frozen BatchNorm and only the
last ``trainable_layers`` stages trainable.

``weights`` is either a torchvision weights name (``"ResNet18_Weights.IMAGENET1K_V1"``, or
just ``"IMAGENET1K_V1"`` / ``"DEFAULT"`` for the configured backbone) that must already sit in
the torch hub cache (``$TORCH_HOME/hub/checkpoints``), or the path of a ``.pth`` state dict of
the classification network. A missing file is a :class:`ModelError` naming it, never a
download attempt that would hang without network access.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_weight, mobilenet_v3_large, resnet18, resnet50
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from polydet.core.config import ModelConfig
from polydet.core.errors import ModelError

# The classification networks behind each backbone name, and their torchvision weights enum.
_TRUNKS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18_fpn": (resnet18, "ResNet18_Weights"),
    "resnet50_fpn": (resnet50, "ResNet50_Weights"),
    "mobilenet_v3_fpn": (mobilenet_v3_large, "MobileNet_V3_Large_Weights"),
}
_MAX_TRAINABLE = {"resnet18_fpn": 5, "resnet50_fpn": 5, "mobilenet_v3_fpn": 6}


def _torchvision_weights(name: str, backbone: str) -> WeightsEnum:
    """Resolve a weights name; a short name is taken relative to the backbone's enum."""
    full = name if "." in name else f"{_TRUNKS[backbone][1]}.{name}"
    try:
        return get_weight(full)
    except (ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"model.weights: unknown torchvision weights {name!r} ({e})") from e


def _load_weights(spec: str, backbone: str) -> dict[str, torch.Tensor]:
    """State dict of the classification trunk from a file or the torch hub cache."""
    path = Path(spec).expanduser()
    looks_like_file = path.suffix in {".pth", ".pt"} or "/" in spec or path.exists()
    if not looks_like_file:
        weights = _torchvision_weights(spec, backbone)
        filename = Path(urlparse(weights.url).path).name
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            raise ModelError(
                f"model.weights: pretrained weights {spec!r} are not in the torch hub cache: "
                f"{path} is missing (download {weights.url} there; no network access is assumed)"
            )
    if not path.is_file():
        raise ModelError(f"model.weights: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for corrupt files
        raise ModelError(f"model.weights: cannot read weights file {path}: {e}") from e
    if not isinstance(state, dict):
        raise ModelError(f"model.weights: {path} does not hold a state dict")
    return state


def build_backbone(cfg: ModelConfig, load_weights: bool = True) -> BackboneWithFPN:
    """Backbone + FPN from the model config.

    Returns a module mapping a ``[B, 3, H, W]`` normalised batch to an ordered dict of
    ``len(cfg.returned_layers) + 1`` feature maps ``[B, fpn_channels, H/s, W/s]`` named
    ``"0", "1", ..., "pool"`` (one more, the stride-4 level first, with
    ``cfg.fine_roi_level``), with ``out_channels == cfg.fpn_channels``. With
    ``load_weights=False`` a pretrained configuration gets its architecture (frozen
    BatchNorm, frozen stages) without reading the weights (``load_model`` restores them).
    """
    if cfg.backbone not in _TRUNKS:
        raise ModelError(f"model.backbone: unknown backbone {cfg.backbone!r}")
    make_trunk, _ = _TRUNKS[cfg.backbone]
    pretrained = cfg.weights is not None
    # Frozen statistics only make sense when they come from pretraining.
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    trunk = make_trunk(weights=None, norm_layer=norm_layer)
    if pretrained and load_weights:
        assert cfg.weights is not None
        state = _load_weights(cfg.weights, cfg.backbone)
        try:
            trunk.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(
                f"model.weights: {cfg.weights} does not fit {cfg.backbone}: {e}"
            ) from e
    max_trainable = _MAX_TRAINABLE[cfg.backbone]
    trainable = cfg.trainable_layers if pretrained else max_trainable
    if not 0 <= trainable <= max_trainable:
        raise ModelError(
            f"model.trainable_layers: {trainable} is outside [0, {max_trainable}] "
            f"for {cfg.backbone}"
        )
    layers = list(cfg.returned_layers)
    if cfg.fine_roi_level:  # ResNet layer 1 (stride 4) as FPN level "0", for RoIAlign only
        if cfg.backbone == "mobilenet_v3_fpn" or min(layers) <= 1:
            raise ModelError(
                "model.fine_roi_level: needs a ResNet backbone whose returned_layers start "
                f"above layer 1 (got {cfg.backbone}, {layers})"
            )
        layers = [1, *layers]
    try:
        if cfg.backbone == "mobilenet_v3_fpn":
            body = _mobilenet_extractor(trunk, True, trainable, returned_layers=layers)
        else:
            body = _resnet_fpn_extractor(trunk, trainable, returned_layers=layers)
    except ValueError as e:
        raise ModelError(f"model.returned_layers: {layers}: {e}") from e
    assert isinstance(body, BackboneWithFPN)
    # torchvision's extractors hard-code 256 FPN channels; a narrow FPN is much faster on CPU.
    in_channels = [block[0].in_channels for block in body.fpn.inner_blocks]
    body.fpn = FeaturePyramidNetwork(
        in_channels, cfg.fpn_channels, extra_blocks=body.fpn.extra_blocks
    )
    body.out_channels = cfg.fpn_channels
    return body
