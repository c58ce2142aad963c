"""Layer 4, training: the anchors stage (:mod:`~polydet.train.anchors`), the training loop
(:mod:`~polydet.train.engine`), checkpoints (:mod:`~polydet.train.checkpoint`) and DDP
plumbing (:mod:`~polydet.train.distributed`). Several devices:
``torchrun --nproc-per-node N -m polydet.cli train``. Nothing is imported here."""
