"""Models: layers and hooks, captures and gradients between layers, checkpoints, model loading, fine-tuning, the
gradient-flow modification (smoothing)."""
