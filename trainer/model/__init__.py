"""Model files to diffusers modules: SD1/SD2/SDXL families, loading folders and single files, the built-in models,
merging a LoRA into a checkpoint."""
