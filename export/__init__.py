"""Fold BatchNorm, export ONNX, verify the graph against PyTorch and write the model repository."""
