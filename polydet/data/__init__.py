"""The data half of polydet: synthetic data, label formats, validation, tiling, the prepared
dataset (manifest, statistics, split) and the training ``Dataset`` with its augmentations.

Modules: :mod:`~polydet.data.synth` (the default dataset), :mod:`~polydet.data.formats`
(readers/writers), :mod:`~polydet.data.validate` (import checks and summary),
:mod:`~polydet.data.quads` (polygon -> quad rule), :mod:`~polydet.data.layouts` (where each
format keeps images and labels), :mod:`~polydet.data.tiling`, :mod:`~polydet.data.manifest`,
:mod:`~polydet.data.prepare` (the stage), :mod:`~polydet.data.dataset` and
:mod:`~polydet.data.augment`. Nothing is imported here, so importing one stays cheap.
"""
