"""Sparse autoencoders: the base every SAE plugin subclasses, training, sweeps, evaluation (paper 001 sec. 8)."""
