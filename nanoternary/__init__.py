"""nanoternary: a ternary language model (FlashLM v3) written from scratch in NumPy; see README.md."""
from . import checkpoint  # noqa: F401  (attaches Model.load: model.py itself knows no file format)
