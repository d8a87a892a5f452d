"""regularizers (in progress)."""
