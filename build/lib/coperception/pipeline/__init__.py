"""Composition layer: builds the agent side (encode -> select -> code -> packets) and the ego side
(receive -> decode -> warp -> fuse -> head) from the stage registries. Training, evaluation and the
benchmarks use only this layer to run a cooperation method."""
