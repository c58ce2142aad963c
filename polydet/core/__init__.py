"""Layer 0, no machine learning: settings (:mod:`~polydet.core.config`), errors, file writing
(:mod:`~polydet.core.files`) and the project lock (:mod:`~polydet.core.locks`).
Nothing is imported here, so importing one stays cheap."""
