"""normserve's serving side: the model repository served over the Open Inference Protocol. Needs no torch."""

from service import compiled

__version__ = "0.1.0"

# Before any request-path module is imported: from its Cython build where that is current (service/compiled.py).
compiled.install()
