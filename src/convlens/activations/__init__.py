"""Activations out of a model: filtered sampling, extraction into a store, the store reader, filter comparison."""
