"""normserve's serving side: the model repository served over the Open Inference Protocol. Needs no torch."""

__version__ = "0.1.0"
