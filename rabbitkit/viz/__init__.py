"""Built-in visualizers (one module each, registered through ``rabbit_visualizers``)."""
