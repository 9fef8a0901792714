"""Inference: generation engine and terminal chat."""
