"""Layer 5, using a trained model: prediction on images (:mod:`~polydet.deploy.predict`) and
ONNX / TorchScript export (:mod:`~polydet.deploy.export`). Nothing is imported here."""
