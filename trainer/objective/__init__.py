"""What training minimises and how: the diffusion objective, optimizers and schedules, LoRA inits, EMA,
validation loss."""
