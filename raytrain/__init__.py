"""raytrain: raw text to a served language model on Ray.

The public surface is small on purpose; heavy libraries (torch, deepspeed, transformers) are
imported inside the functions that need them so that the CLI and config validation stay fast.
"""

__version__ = "0.1.0"
