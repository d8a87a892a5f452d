"""Built-in architectures (one module per family, each registered through
``rabbit_architectures``)."""
