"""The network and its pure, jit-compiled math: the U-Net, augmentation, the loss,
normalisation."""
