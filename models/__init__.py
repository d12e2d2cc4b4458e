"""PyTorch models with BatchNorm, GroupNorm, InstanceNorm or LayerNorm, their data and their training."""
