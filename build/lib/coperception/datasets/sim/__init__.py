"""The synthetic cooperative world: scene generation, ray-cast sensors, dataset writers."""

from coperception.datasets.sim.simulate import simulate

__all__ = ["simulate"]
