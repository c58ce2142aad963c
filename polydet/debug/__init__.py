"""Layer 5, the debugging report: the analysis (:mod:`~polydet.debug.analysis`), its drawings
(:mod:`~polydet.debug.plots`) and the report stage (:mod:`~polydet.debug.report`).
Nothing is imported here."""
