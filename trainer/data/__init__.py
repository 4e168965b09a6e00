"""A folder of images to batches: reading images and captions, aspect-ratio buckets, the batch plan, the step count,
loss masks (docs/ARCHITECTURE.md)."""
