"""Experiments: measured evidence for every claim docs/batchnorm.md makes about normalization layers."""
