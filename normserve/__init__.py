"""The ``normserve`` command: export a PyTorch module, import an ONNX file, serve the repository."""
