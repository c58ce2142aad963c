"""Two-stage polybox detector (Faster R-CNN from torchvision parts).

``build_model(cfg.model, anchors=None) -> PolyDetector``; ``PolyDetector.loss / predict /
inspect``; ``save_model`` / ``load_model`` for model files. One idea per module:
:mod:`~polydet.model.backbone`, :mod:`~polydet.model.rpn`, :mod:`~polydet.model.roi_heads`,
:mod:`~polydet.model.detector`, :mod:`~polydet.model.io`.
"""

from polydet.model.detector import PolyDetector, build_model
from polydet.model.io import load_model, save_model

__all__ = ["PolyDetector", "build_model", "load_model", "save_model"]
