"""One run, start to finish: the training loop, its outputs (events, samples, checkpoints, files), the run
folder, resume state, stop signals and preview sampling."""
