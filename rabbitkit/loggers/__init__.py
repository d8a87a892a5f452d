"""Built-in loggers: plugins that follow a run through the lifecycle hooks (one module each)."""
