"""compiled: TODO docstring."""
