"""Small example models for ``normserve export MODULE:CALLABLE``, one architecture family to a file.

Each file's ``build()`` returns its model in eval mode with seeded random weights and running
statistics calibrated on seeded random inputs (``examples/_calibrate.py``); each module docstring
says which BatchNorms fold into the layer before them and which cannot. README.md has the table.
"""
