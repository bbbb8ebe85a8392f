"""The engine's weight files: where models come from (hub, mirror, demo), their published layouts, the one-time
conversion of upstream's original layout, and the tiny random-weight checkpoints tests and the demo build.

Torch-free to import except `convert` and `random_pipeline`, which import torch/diffusers at module level.
"""
