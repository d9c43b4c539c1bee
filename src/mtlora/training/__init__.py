"""Training: argument dataclasses, the Trainer subclass with the auxiliary losses, and the `train()` driver."""
