"""Fusion stage: warp once (`warp.warp_to_ego`), then one registered `Fusion` module per method."""

from coperception.fusion import attention, simple, trust  # noqa: F401  (registration)
