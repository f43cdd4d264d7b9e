"""Fusion of ego-aligned agent features (DESIGN §7): warp once, fuse many."""

from coperception.fusion import simple  # noqa: F401  (registers the element-wise fusions)
