"""Checkpoints: the files (atomic, resumable, safe to load) and the one way to open a model.

``files``: the step-dir layout, atomic save, discovery, validation, weights and trainer state.
``packed``: the packed single-file format (layout, reader).
``open``: :func:`open_checkpoint`, which every model reader goes through.
"""

from .open import KINDS, OpenedModel, open_checkpoint

__all__ = ["KINDS", "OpenedModel", "open_checkpoint"]
