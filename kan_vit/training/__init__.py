"""Training: configs, data, optimizers, the loop, checkpoints and the backends it runs on."""
