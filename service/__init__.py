"""normserve's serving side: reads the model repository and, next, serves it over HTTP. Needs no torch."""
