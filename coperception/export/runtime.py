"""Evaluating exported graphs: an onnxruntime model behind the interface the comm session and the
evaluation use, so `coperception eval --onnx DIR` reports AP and bytes exactly as for torch.

The agent graph gives each view's features, confidence and codes (the codes a sender transmits come
from the graph); the ego graph fuses what arrived and runs the head. Selection, packets, the channel,
decoding received codes (a codebook lookup), box decoding and NMS run around them, as deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from coperception.config import ExperimentConfig, config_from_dict
from coperception.datasets.voxelize import Voxels
from coperception.errors import DataFormatError
from coperception.export.graphs import ExportError
from coperception.export.onnx import AGENT_INPUTS, EGO_INPUTS, agent_inputs, ego_inputs, full_codes, ort_session
from coperception.io import read_json, read_yaml
from coperception.models.heads import HeadOutput
from coperception.pipeline.ego import Delivery
from coperception.pipeline.session import EncodedViews
from coperception.types import AgentBatch


def load_export_config(folder: str | Path, overrides: list[str]) -> ExperimentConfig:
    """The config an export was made with (`config.yaml` beside the graphs), with `overrides`."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise DataFormatError(path, "missing: not a folder written by `coperception export`")
    return config_from_dict(read_yaml(path), overrides, str(path))


class OnnxRuntimeModel:
    """The exported agent and ego graphs of `folder` in place of a `CooperativeModel` at evaluation."""

    training = False

    def __init__(self, folder: str | Path, cfg: ExperimentConfig):
        from coperception.pipeline.model import build_model

        folder = Path(folder)
        self.spec: dict[str, Any] = read_json(folder / "spec.json")
        if cfg.comm.consistency.enabled:
            raise ExportError("eval --onnx: comm.consistency needs the head on combined features, which the exported "
                              "graphs do not contain; evaluate without it")
        if cfg.fusion.motion.enabled:
            raise ExportError("eval --onnx: motion compensation (fusion.motion.enabled) is not in the exported ego "
                              "graph; evaluate without it")
        shell = build_model(cfg)  # selection, codec, anchors and strategy; the weights come from the graphs
        if shell.agent is None:
            raise ExportError("eval --onnx: the export is not an intermediate-fusion model")
        quantizer = getattr(shell.agent.codec, "quantizer", None)
        if quantizer is not None:
            book = np.load(folder / "codebook.npy")
            quantizer.codebook.copy_(torch.from_numpy(book))
            if quantizer.digest().hex() != self.spec.get("codebook_hash"):
                raise DataFormatError(folder / "codebook.npy", "does not match the codebook hash in spec.json")
        self.strategy, self.anchors, self.agent = shell.strategy, shell.anchors, shell.agent
        self.feature_grid = shell.feature_grid
        self.agent_graph = ort_session(folder / "agent.onnx")
        self.ego_graph = ort_session(folder / "ego.onnx")
        self.capacity = int(self.spec["agent_graph"]["pillar_capacity"])
        self._device = torch.empty(0)

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def train(self, mode: bool = True) -> "OnnxRuntimeModel":
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        yield self._device  # evaluation asks where the model lives: the CPU

    def _views(self, batch: AgentBatch) -> Iterator[Voxels]:
        lidar = batch.lidar
        assert lidar is not None
        slot = lidar.coords[:, 0]
        for k in range(batch.n_agents):
            pick = slot == k
            yield Voxels(lidar.voxels[pick].numpy(), lidar.coords[pick, 1:].numpy().astype(np.int32),
                         lidar.num_points[pick].numpy().astype(np.int32))

    def encode(self, batch: AgentBatch) -> EncodedViews:
        """Every view through the agent graph: features, confidence and (codebook) codes."""
        outs = [self.agent_graph.run(None, {n: a.numpy() for n, a in zip(AGENT_INPUTS, agent_inputs(v, self.capacity))})
                for v in self._views(batch.to("cpu"))]
        feats = torch.from_numpy(np.concatenate([o[0] for o in outs]))
        conf = torch.from_numpy(np.concatenate([o[1] for o in outs]))
        cells = self.feature_grid.cells
        codes = torch.from_numpy(np.stack([full_codes(o[2], o[3], cells) for o in outs])) if len(outs[0]) > 2 else None
        return EncodedViews(feats, conf, codes)

    def confidence(self, feats: torch.Tensor) -> torch.Tensor:
        raise ExportError("the exported graphs give confidence only with the agent graph's features")

    def receive(self, delivery: Delivery) -> HeadOutput:
        """Every sample's delivery through the ego graph."""
        starts = np.cumsum([0] + list(delivery.record_len[:-1]))
        cls, reg, direction = [], [], []
        for start, n in zip(starts, delivery.record_len):
            arrived = delivery.arrived[start:start + n] if delivery.arrived is not None else None
            one = Delivery(delivery.features[start:start + n], arrived, [n], delivery.T_ego_from_agent[start:start + n],
                           delivery.age[start:start + n], delivery.kind[start:start + n])
            out = self.ego_graph.run(None, {k: a.numpy() for k, a in zip(EGO_INPUTS, ego_inputs(one, self.feature_grid))})
            cls.append(out[0])
            reg.append(out[1])
            direction.append(out[2])
        return HeadOutput(torch.from_numpy(np.concatenate(cls)), torch.from_numpy(np.concatenate(reg)),
                          torch.from_numpy(np.concatenate(direction)))
