"""The toy world: a procedural video domain where the whole method runs and is measured on a CPU."""
