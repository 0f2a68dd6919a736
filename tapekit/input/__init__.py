"""input: TODO docstring."""
