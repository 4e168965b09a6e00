"""Batch supply: latent and text caches, prefetch workers, and `BatchSupply`, which gives the training step its
inputs and drops the encoders the caches replace."""
