"""Training: models' losses, augmentations, the one-fold trainer, cv, backends, status."""
