"""checkpoint: TODO docstring."""
