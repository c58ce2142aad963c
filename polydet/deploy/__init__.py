"""Layer 5, using a trained model: prediction on images (:mod:`~polydet.deploy.predict`),
ONNX / TorchScript export (:mod:`~polydet.deploy.export`) and ONNX Runtime without torch
(:mod:`~polydet.deploy.onnx_runtime`). Nothing is imported here."""
