"""initializers (in progress)."""
