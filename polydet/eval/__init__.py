"""Layer 3, evaluation: the metrics (:mod:`~polydet.eval.metrics`), the evaluation stage and
DOTA Task1 scoring (:mod:`~polydet.eval.evaluate`) and its plots (:mod:`~polydet.eval.plots`).
Nothing is imported here."""
