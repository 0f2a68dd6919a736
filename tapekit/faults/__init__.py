"""faults: TODO docstring."""
