"""The after-run pass: the trajectory of tensors, the streaming engine over them, its
compiled kernels and the torchrun split."""
