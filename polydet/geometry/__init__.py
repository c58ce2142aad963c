"""Layer 1, polybox geometry: conversions and canonical order (:mod:`~polydet.geometry.polybox`),
polygon IoU and NMS (:mod:`~polydet.geometry.ops`), the box coder and its losses
(:mod:`~polydet.geometry.coder`). Public paths: ``polydet.polybox``, ``polydet.ops``,
``polydet.coder`` name the same modules. Nothing is imported here."""
