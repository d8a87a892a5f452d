"""losses (in progress)."""
