"""Training: the loop on accelerate, the reference model, checkpoints and resume, the run folder, the divergence guard, trackers and the model card."""
