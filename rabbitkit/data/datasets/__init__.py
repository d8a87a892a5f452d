"""Built-in dataset plugins (one module per dataset)."""
