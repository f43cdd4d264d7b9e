"""Configuration: pydantic models for every YAML section, loading and `--set` overrides.

A config file is YAML with the sections below; every section is optional and defaults
are the synthetic-world CPU preset. Unknown keys and wrong types raise `ConfigError`
naming the file and the key path.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coperception.errors import ConfigError, DataFormatError
from coperception.io import format_validation_error, read_yaml

OPV2V_RANGE = [-140.8, -40.0, -3.0, 140.8, 40.0, 1.0]
OPV2V_EVAL_RANGE = [-140.0, -40.0, -3.0, 140.0, 40.0, 1.0]
DAIR_RANGE = [-102.4, -51.2, -3.5, 102.4, 51.2, 1.5]
# what a DAIR-V2X dataset section means when it leaves these out (ours and HEAL's DAIR configs)
DAIR_DEFAULTS: dict[str, Any] = {"comm_range": 100.0, "max_agents": 2, "point_cloud_range": DAIR_RANGE,
                                 "eval_range": DAIR_RANGE, "gt_z_margin": 1.0}


AGENT_KIND_KEYS = ("default", "vehicle", "rsu")
BASELINE_STRATEGIES = ("none", "early", "late")  # the cooperation strategies that send no BEV features


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_range(value: list[float]) -> list[float]:
    if len(value) != 6 or not all(math.isfinite(v) for v in value) or any(value[i] >= value[i + 3] for i in range(3)):
        raise ValueError("expected 6 finite numbers [xmin, ymin, zmin, xmax, ymax, zmax] with min < max")
    return value


class DatasetConfig(Strict):
    """Which data, where, and how a cooperative sample is assembled (DESIGN §3)."""

    format: Literal["opv2v", "dair-v2x"] = "opv2v"
    root: str = "data/sim_opv2v"
    train_split: str = "train"
    val_split: str = "validate"
    eval_split: str = "test"
    comm_range: float = Field(70.0, gt=0)
    max_agents: int = Field(5, ge=1)
    point_cloud_range: list[float] = Field(default_factory=lambda: list(OPV2V_RANGE))
    eval_range: list[float] = Field(default_factory=lambda: list(OPV2V_EVAL_RANGE))
    # metres added below zmin and above zmax when ground truth is filtered (HEAL does so for DAIR-V2X,
    # where tall trucks and buses near the ego would otherwise leave the GT)
    gt_z_margin: float = Field(0.0, ge=0)
    load_cameras: bool = False
    # which sensors each agent kind carries (`vehicle`, `rsu`; `default` for kinds not listed): `lidar`,
    # `camera` or both. An agent's data of a sensor it does not carry is dropped when its views are prepared
    # (no points of a camera-only car reach any model, early fusion included); images are read when a kind
    # carries a camera
    sensors: dict[str, list[Literal["lidar", "camera"]]] = Field(default_factory=lambda: {"default": ["lidar"]})
    # DAIR-V2X-C: split name -> JSON file of vehicle frame ids (a list, as CoAlign/HEAL's train.json and
    # val.json, or the official split file with `cooperative_split`); default `<root>/split/<name>.json`
    split_files: dict[str, str] = Field(default_factory=dict)

    _range = field_validator("point_cloud_range", "eval_range")(_check_range)

    @field_validator("sensors")
    @classmethod
    def _sensor_kinds(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(AGENT_KIND_KEYS))
        if unknown or "default" not in value:
            raise ValueError(f"keys are agent kinds {list(AGENT_KIND_KEYS)} and must include 'default'"
                             + (f"; unknown {unknown}" if unknown else ""))
        empty = [k for k, v in value.items() if not v]
        if empty:
            raise ValueError(f"kind(s) {empty} carry no sensor; give each kind `lidar`, `camera` or both")
        return value

    def sensors_of(self, kind: str) -> list[str]:
        """The sensors agents of `kind` (`vehicle`, `rsu`) carry."""
        return self.sensors.get(kind, self.sensors["default"])

    @property
    def reads_images(self) -> bool:
        """Whether readers load camera images (`load_cameras`, or some kind carries a camera)."""
        return self.load_cameras or any("camera" in v for v in self.sensors.values())

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: Any) -> Any:
        # a DAIR-V2X config that leaves these out gets DAIR's published values, not OPV2V's
        if isinstance(data, dict) and data.get("format") == "dair-v2x":
            data = {**DAIR_DEFAULTS, **data}
        return data

    def gt_range(self, of: list[float] | None = None) -> list[float]:
        """`of` (default: the eval range) with the ground-truth z margin; a box is GT when its 8 corners lie inside."""
        r = list(self.eval_range if of is None else of)
        return [r[0], r[1], r[2] - self.gt_z_margin, r[3], r[4], r[5] + self.gt_z_margin]


class LidarConfig(Strict):
    beams: int = Field(32, ge=1)
    azimuth_steps: int = Field(768, ge=8)
    vertical_fov: tuple[float, float] = (-30.0, 10.0)  # HDL-32E-like
    max_range: float = Field(100.0, gt=0)
    range_noise: float = Field(0.02, ge=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    intensity_noise: float = Field(0.03, ge=0)
    mount_height: float = Field(1.9, gt=0)
    rsu_mount_height: float = Field(6.0, gt=0)

    @field_validator("vertical_fov")
    @classmethod
    def _fov(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not -90 <= v[0] < v[1] <= 90:
            raise ValueError("expected (lower, upper) degrees with -90 <= lower < upper <= 90")
        return v


class CameraConfig(Strict):
    width: int = Field(128, ge=8)
    height: int = Field(96, ge=8)
    fov_deg: float = Field(100.0, gt=10, lt=170)


class SimulatorConfig(Strict):
    """The synthetic cooperative world (DESIGN §4)."""

    seed: int = 0
    scenarios: dict[str, int] = Field(default_factory=lambda: {"train": 6, "validate": 1, "test": 2})
    frames: int = Field(40, ge=1)
    min_agents: int = Field(3, ge=1)
    max_agents: int = Field(4, ge=1)
    rsu_probability: float = Field(0.9, ge=0, le=1)
    moving_vehicles: tuple[int, int] = (18, 28)
    parked_vehicles: tuple[int, int] = (12, 20)
    buildings_per_block: tuple[int, int] = (2, 4)
    trees: tuple[int, int] = (16, 30)
    label_radius: float = Field(60.0, gt=0)  # each CAV logs the vehicles within this distance
    lidar: LidarConfig = Field(default_factory=LidarConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    dair_async_ms: tuple[float, float] = (0.0, 80.0)
    dair_offset_probability: float = Field(0.6, ge=0, le=1)

    @model_validator(mode="after")
    def _agents(self) -> "SimulatorConfig":
        if self.min_agents > self.max_agents:
            raise ValueError("min_agents must not exceed max_agents")
        return self


class CameraModelSettings(Strict):
    """The lift-splat camera encoder (`lss`, `models/camera.py`)."""

    image_size: tuple[int, int] = (128, 96)  # width, height every image is resized to (intrinsics scaled alike)
    # depth bins along each pixel's ray: `depth_bins` equal steps from depth_min to depth_max metres
    depth_min: float = Field(2.0, gt=0)
    depth_max: float = Field(58.0, gt=0)
    depth_bins: int = Field(56, ge=2)
    image_channels: int = Field(64, ge=8)  # width of the image backbone
    stride: Literal[4, 8] = 8  # pixels per feature of the image backbone
    # training only: weight of a cross-entropy between each feature pixel's depth distribution and the bin
    # of the nearest LiDAR return of the agent's recorded scan that projects into it (0: no depth supervision;
    # the points are read for the targets of training samples only, never as a camera agent's input)
    depth_loss_weight: float = Field(0.0, ge=0)

    def depth_centres(self) -> list[float]:
        """The depths (metres along the optical axis) of the depth bins: what the encoder lifts to and what
        training depth targets are binned by."""
        step = (self.depth_max - self.depth_min) / (self.depth_bins - 1)
        return [self.depth_min + i * step for i in range(self.depth_bins)]

    @model_validator(mode="after")
    def _depths(self) -> "CameraModelSettings":
        if self.depth_max <= self.depth_min:
            raise ValueError("depth_max must exceed depth_min")
        if self.image_size[0] % self.stride or self.image_size[1] % self.stride:
            raise ValueError(f"image_size {list(self.image_size)} must be a multiple of stride {self.stride}")
        return self


class ModelConfig(Strict):
    """PointPillars detector. Defaults are the small CPU preset for the synthetic world; the
    published OPV2V preset is voxel 0.4 m, 64 PFN channels, layers [3, 5, 5], filters [64, 128, 256]."""

    # the BEV encoder of each agent kind (`vehicle`, `rsu`; `default` for kinds not listed), by its
    # registered name; kinds naming the same encoder share one set of its weights
    # `a+b` (e.g. `pointpillars+lss`): the kind runs both and fuses their BEV maps before communication
    encoders: dict[str, str] = Field(default_factory=lambda: {"default": "pointpillars"})
    camera: CameraModelSettings = Field(default_factory=CameraModelSettings)
    voxel_size: tuple[float, float, float] = (0.8, 0.8, 4.0)
    max_points_per_voxel: int = Field(32, ge=1)
    # who groups points into voxels: `numpy` (vectorized, always there) or `spconv` (its PointToVoxel; the
    # `spconv` extra); both give the same voxels
    voxelizer: Literal["numpy", "spconv"] = "numpy"
    # pillars kept per agent view in training; above it a random subset is kept (seeded per sample)
    max_voxels: int = Field(32000, ge=1)
    # the same cap at evaluation (None: max_voxels); OpenCOOD's OPV2V preset keeps 70000 there
    max_voxels_test: int | None = Field(None, ge=1)
    pfn_channels: int = Field(32, ge=1)
    layers: list[int] = Field(default_factory=lambda: [2, 3, 3])
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2])
    filters: list[int] = Field(default_factory=lambda: [32, 64, 128])
    upsample_filters: list[int] = Field(default_factory=lambda: [32, 32, 32])
    anchor_size: tuple[float, float, float] = (3.9, 1.6, 1.56)
    anchor_z: float = -1.0
    anchor_yaws_deg: list[float] = Field(default_factory=lambda: [0.0, 90.0])
    pos_iou: float = Field(0.6, gt=0, le=1)
    neg_iou: float = Field(0.45, ge=0, le=1)

    @model_validator(mode="after")
    def _lengths(self) -> "ModelConfig":
        if not (len(self.layers) == len(self.strides) == len(self.filters) == len(self.upsample_filters)):
            raise ValueError("layers, strides, filters and upsample_filters must have the same length")
        if not self.layers:
            raise ValueError("layers: at least one backbone block")
        if min(self.voxel_size) <= 0 or not all(math.isfinite(v) for v in self.voxel_size):
            raise ValueError(f"voxel_size: positive finite sizes expected, got {list(self.voxel_size)}")
        if not self.anchor_yaws_deg:
            raise ValueError("anchor_yaws_deg: at least one anchor yaw")
        if self.neg_iou > self.pos_iou:
            raise ValueError("neg_iou must not exceed pos_iou")
        unknown = sorted(set(self.encoders) - set(AGENT_KIND_KEYS))
        if unknown or "default" not in self.encoders:
            raise ValueError(f"encoders: keys are agent kinds {list(AGENT_KIND_KEYS)} and must include 'default'"
                             + (f"; unknown {unknown}" if unknown else ""))
        return self


class ChannelConfig(Strict):
    """The radio link from each sender to the ego (see `comm/channel.py`)."""

    bandwidth_mbps: float = Field(27.0, gt=0)  # per link; 27 Mbit/s is the top DSRC / 802.11p rate
    latency_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)  # |N(0, sigma)| added per packet
    processing_ms: float = Field(0.0, ge=0)  # encode time before the first packet leaves
    fusion_deadline_ms: float = Field(50.0, ge=0)  # the ego fuses what has arrived this long after its capture
    # a sender waits this long after its capture for the ego's broadcast of the same frame (pose, filling
    # request); without it by then it goes on with the newest broadcast it heard
    broadcast_wait_ms: float = Field(10.0, ge=0)
    # the ego ignores messages captured longer ago than this (None: fuse the newest, however old);
    # without motion compensation old features of moving cars can cost more than they add
    max_message_age_ms: float | None = Field(None, gt=0)
    loss_rate: float = Field(0.0, ge=0, le=1)  # stationary Gilbert–Elliott packet loss
    mean_burst_packets: float = Field(2.0, ge=1)  # mean length of a loss burst
    pose_noise_m: float = Field(0.0, ge=0)  # sigma of the sender's reported x and y
    pose_noise_deg: float = Field(0.0, ge=0)  # sigma of the sender's reported yaw
    mtu: int = Field(1200, ge=200)
    seed: int = 0


class SelectionSettings(Strict):
    """Which cells a sender transmits (see `comm/select.py`)."""

    threshold: float | None = Field(0.1, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    smooth_sigma: float = Field(0.0, ge=0)
    filling: bool = False  # information filling: senders fill only what the ego lacks
    request_threshold: float = Field(0.5, ge=0, le=1)
    # senders widen each requested cell to its (2r+1)^2 neighbourhood: the ego's confident cells mark
    # object centres, its features cover the whole object (the request on the wire stays the centres)
    request_dilation: int = Field(1, ge=0)


class CodebookSettings(Strict):
    """Residual multi-codebook VQ: `segments` x `stages` codes of log2(`codes`) bits per cell."""

    segments: int = Field(4, ge=1)
    stages: int = Field(2, ge=1)
    codes: int = Field(256, ge=2, le=65536)
    decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    # before training, fit the codes by k-means on the selected cells of this many training samples
    fit_samples: int = Field(120, ge=1)
    fit_iterations: int = Field(25, ge=1)

    @field_validator("codes")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v


class ConsistencySettings(Strict):
    """The ego's check of each sender's message against its own evidence (see `pipeline/consistency.py`)."""

    enabled: bool = False
    # a sender "claims" a cell where the ego's head exceeds this with its features only
    claim_threshold: float = Field(0.2, gt=0, lt=1)
    # ... and the ego contradicts a claim in free space where its own confidence is below this
    ego_threshold: float = Field(0.1, gt=0, lt=1)
    max_conflict_fraction: float = Field(0.25, ge=0, le=1)  # drop the message above this share of contradicted claims
    min_conflicts: int = Field(6, ge=1)  # ... and at least this many contradicted cells
    # ego returns below this height (m, ego LiDAR frame) are ground: their rays cross empty cells
    ground_z: float = -1.4


class CommConfig(Strict):
    """What is sent between agents and over which channel (intermediate cooperation)."""

    # message codec: `dense` the whole fp32 BEV map (delivered without the channel), `sparse` the
    # selected cells as fp32 (Where2comm-style), `codebook` the selected cells as residual-codebook codes
    codec: str = "dense"
    max_agents: int = Field(5, ge=1)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    codebook: CodebookSettings = Field(default_factory=CodebookSettings)
    channel: ChannelConfig = Field(default_factory=ChannelConfig)
    # per-agent HMAC keys, JSON {"<agent id>": "<hex key>"} (tools/make_keys.py writes one): when set, every
    # packet is signed with its sender's key and the ego accepts only signed, fresh, not replayed packets
    key_file: str | None = None
    freshness_ms: float = Field(1000.0, gt=0)  # with keys: capture times older than this (or ahead) are refused
    consistency: ConsistencySettings = Field(default_factory=ConsistencySettings)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sign" in data:
            raise ValueError("comm.sign was replaced by comm.key_file: signing is on whenever per-agent keys are "
                             "configured (keys derived from a seed would let anyone sign as any agent)")
        return data


class CooperationConfig(Strict):
    """What agents share: `none` (ego only), `early` (raw points), `late` (boxes + NMS),
    `intermediate` (BEV features coded by `comm.codec`, fused by `fusion.method`) or `anchor` (coded
    anchors, refined by `fusion.anchor`)."""

    strategy: str = "intermediate"
    # intermediate: each sender encodes its points moved into the ego frame (OpenCOOD `proj_first`);
    # false: it encodes in its own frame and the ego rotates the feature map (yaw then differs per agent)
    project_first: bool = True
    # with `project_first`, at evaluation: a sender projects into the ego pose predicted for the ego frame that
    # will fuse its message (`pipeline.session.pose_ahead`: the link delay and the ego's motion from the last
    # broadcasts it heard) instead of the pose of the newest broadcast, so a late message lands on the ego's
    # grid lattice (the backbone is far from shift-equivariant: computed 0.4 m off the ego's lattice and warped
    # back, a sender's features differ by 36 % and max fusion loses 9 points AP@0.5 here)
    project_ahead: bool = True


LEGACY_METHODS = {
    "none": "cooperation.strategy: none", "early": "cooperation.strategy: early", "late": "cooperation.strategy: late",
    "where2comm": "cooperation.strategy: intermediate, comm.codec: sparse, fusion.method: max",
    "codebook": "cooperation.strategy: intermediate, comm.codec: codebook, fusion.method: max",
}


class MotionSettings(Strict):
    """Motion compensation of late messages (`fusion/motion.py`): senders track their own detections and
    send the moving ones' velocities; the ego moves each message forward by its age before fusing."""

    enabled: bool = False
    min_speed_mps: float = Field(1.0, ge=0)  # slower objects are not sent (they would not move a cell)
    max_speed_mps: float = Field(40.0, gt=0)  # the matching gate between a sender's frames
    # a track's velocity: the least-squares slope of its last `window` positions
    window: int = Field(10, ge=2)
    # a track seen fewer times keeps only its velocity along its detected heading (1: never)
    heading_below: int = Field(6, ge=1)
    max_gap_s: float = Field(0.35, gt=0)  # a longer gap between a sender's frames restarts its tracks
    # a track seen twice or more takes only a detection within this many metres of where it predicts its
    # object (None: any within max_speed_mps x gap, which lets a young track jump to a neighbouring car);
    # 1.5 with outlier_m 1 helped on the validation split but cost 0.3 points over the test table's motion
    # rows (anchor-centric 1.2 at every delay and seed): off (README, outputs/bench/fusion_with_gate.json)
    gate_m: float | None = Field(None, gt=0)
    # a track's positions further than this from the line its velocity fit draws through its newest one (a
    # detection of another object taken by mistake) are left out and the velocity fitted again (None: one fit)
    outlier_m: float | None = Field(None, gt=0)
    margin_m: float = Field(1.0, ge=0)  # footprints grow by this much on every side (0.5: worse on validation)
    snap_to_cells: bool = True  # the ego moves an object by whole feature cells (`fusion.motion.compensate`)
    # at most this many moving objects (the fastest) per message: their 9 bytes each ride in the first packet
    max_objects: int = Field(48, ge=1, le=255)


class AnchorSettings(Strict):
    """Anchor-centric cooperation (`cooperation.strategy: anchor`, `fusion/anchor_centric.py`): senders send
    their most confident anchors (box + coded anchor feature), the ego refines its own anchors and the
    received ones with cross-attention over the received anchors nearby."""

    max_anchors: int = Field(12, ge=1, le=255)  # per message: the most confident after NMS
    min_score: float = Field(0.2, ge=0, le=1)  # a sender sends anchors at least this confident
    feature_dim: int = Field(16, ge=1)  # the anchor feature is projected to this many values, then coded
    stages: int = Field(1, ge=1)  # residual code stages per anchor feature
    codes: int = Field(256, ge=2, le=65536)  # codes per stage (log2 bits each)
    ego_candidates: int = Field(64, ge=1)  # the ego's own anchors refined (most confident after NMS)
    candidate_score: float = Field(0.05, ge=0, le=1)  # ... at least this confident
    radius_m: float = Field(4.0, gt=0)  # an anchor attends to received anchors whose centres lie this close
    # which candidates of an ego that received anchors the refinement changes: `all` (one score scale for
    # every candidate) or only those a received anchor is `near` (the others keep the detector's)
    rescore: Literal["all", "near"] = "all"
    # true: the refinement also corrects each candidate's box (learned; it lowered the share of ground truth
    # any candidate covers at IoU 0.5 from 0.83 to 0.79 here, so it is off); false: it only rescores
    refine_boxes: bool = False
    # each detection becomes the score-weighted mean of the candidates overlapping it by this BEV IoU (None:
    # off): several agents' boxes of one object average out their errors (0.2 chosen on the validation split)
    merge_iou: float | None = Field(0.2, gt=0, le=1)
    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=4)
    heads: int = Field(4, ge=1)
    positive_iou: float = Field(0.5, gt=0, lt=1)  # a refined anchor is trained as an object above this IoU
    # training: sigma of the noise added to each sender's pose (m, degrees), so refinement learns misplacement
    train_pose_noise_m: float = Field(0.2, ge=0)
    train_pose_noise_deg: float = Field(0.2, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> "AnchorSettings":
        if self.codes & (self.codes - 1):
            raise ValueError(f"codes must be a power of two, got {self.codes}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        return self


class FusionConfig(Strict):
    """The feature fusion of intermediate cooperation (`max`, `mean`, `attention`, ...) and its
    hyperparameters (`options`, checked against the fusion's own settings); `motion`: motion
    compensation of late messages, for any fusion; `anchor`: anchor-centric cooperation's settings."""

    method: str = "max"
    options: dict[str, Any] = Field(default_factory=dict)
    motion: MotionSettings = Field(default_factory=MotionSettings)
    anchor: AnchorSettings = Field(default_factory=AnchorSettings)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("method") in LEGACY_METHODS:
                raise ValueError(f"fusion.method {data['method']!r} is now a combination of sections: write "
                                 f"{LEGACY_METHODS[data['method']]}")
            if "project_first" in data:
                raise ValueError("fusion.project_first moved to cooperation.project_first")
        return data


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimiser steps (resume continues)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(2e-3, gt=0)
    # the fusion module's own weights (`ego.fusion.`) learn at lr x this: a fusion added to a fine-tuned
    # detector starts at (or near) max fusion and, with Adam, moves at most about lr per step; at the
    # detector's fine-tuning rate its trust or attention network hardly leaves where it started
    fusion_lr_scale: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    # where training, evaluation and benches run: auto (CUDA when present, else CPU), cpu, cuda, cuda:N
    device: str = "auto"
    # mixed precision of the forward pass and loss: fp32 (none), bf16 (CPU or GPU), fp16 (GPU, with loss scaling)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # page-locked host batches for faster copies to the GPU (None: on when the device is CUDA)
    pin_memory: bool | None = None
    out_dir: str = "outputs/train"
    checkpoint_every: int = Field(200, ge=1)
    validate_each_epoch: bool = True
    augment: bool = True
    cache_samples: bool = False  # read the training and validation splits into memory once (small data only)
    # start from another run's weights (e.g. an ego-only model before fine-tuning a fusion);
    # the model section must match, the fusion method may differ
    init_from: str | None = None
    # codebook methods: keep every detector weight (and BatchNorm statistic) of `init_from` and only
    # fit the codebook (its EMA updates need no gradients) and a feature fusion's own weights, so the senders
    # select the same cells (equal bytes); anchor-centric: only train the anchor coder and refinement
    freeze_detector: bool = False
    # intermediate cooperation: drop each sender's whole message with this probability in training, so
    # the model keeps detecting well alone when messages are lost
    message_dropout: float = Field(0.0, ge=0, lt=1)
    # intermediate cooperation: weight of a second detection loss on the ego's own, unfused features (what the
    # ego detects when no message arrives), next to the loss on the fused features (single-agent
    # supervision as in CoAlign/HEAL); trains the fallback path at every step for one extra head pass
    ego_loss_weight: float = Field(0.0, ge=0)
    # intermediate cooperation: with probability `delay_probability` a training sample's senders come from
    # 1..`delay_frames` frames before the ego's (their points and pose of then, the age they really have),
    # so the fusion learns from messages as old as a late channel delivers them (0: always the ego's frame)
    delay_frames: int = Field(0, ge=0)
    delay_probability: float = Field(0.5, ge=0, le=1)
    # with `delay_frames`: the delayed senders' messages reach the fusion moved forward by their objects'
    # true motion (ground truth, training only), as motion compensation moves them at evaluation with the
    # senders' tracked velocities (`fusion.motion`: its min speed, object cap, margin and whole-cell moves);
    # without it the fusion learns what age does to messages nobody moved. Readers with earlier ground
    # truth: OPV2V and the synthetic world
    true_motion: bool = False

    @model_validator(mode="after")
    def _true_motion_needs_delays(self) -> "TrainConfig":
        if self.true_motion and not self.delay_frames:
            raise ValueError("true_motion moves delayed senders' messages forward: it needs delay_frames > 0")
        return self


class EvalConfig(Strict):
    iou_thresholds: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.3, 0.5, 0.7],
                                                                     min_length=1)
    score_threshold: float = Field(0.2, ge=0, le=1)
    nms_threshold: float = Field(0.15, ge=0, le=1)


class DemoConfig(Strict):
    """What `coperception demo` trains and evaluates."""

    ego_epochs: int = Field(6, ge=1)
    fusion_epochs: int = Field(3, ge=1)
    # `early`, or a fusion name (intermediate cooperation with dense fp32 features), each fine-tuned
    # from the ego-only model; `none` and `late` are evaluated with the ego-only model itself
    fusion_methods: list[str] = Field(default_factory=lambda: ["early", "max"])
    eval_methods: list[str] = Field(default_factory=lambda: ["none", "late", "early", "max"])

    @model_validator(mode="after")
    def _trained(self) -> "DemoConfig":
        missing = [m for m in self.eval_methods if m not in ("none", "late", *self.fusion_methods)]
        baseline = [m for m in self.fusion_methods if m in ("none", "late")]
        if baseline:
            raise ValueError(f"fusion_methods {baseline}: none and late use the ego-only model, which is always trained")
        if missing:
            raise ValueError(f"eval_methods {missing} are not trained; add them to fusion_methods")
        return self


class ExperimentConfig(Strict):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    cooperation: CooperationConfig = Field(default_factory=CooperationConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    def variant(self, strategy: str | None = None, codec: str | None = None, fusion: str | None = None,
                train: dict[str, Any] | None = None, **comm: dict[str, Any]) -> "ExperimentConfig":
        """A validated copy with another cooperation strategy / message codec / fusion method, `train`
        fields and comm sections (`selection=`, `codebook=`, `channel=` dicts of fields) updated."""
        data = self.model_dump()
        if strategy is not None:
            data["cooperation"]["strategy"] = strategy
        if codec is not None:
            data["comm"]["codec"] = codec
        if fusion is not None:
            data["fusion"]["method"] = fusion
        data["train"].update(train or {})
        for section, values in comm.items():
            data["comm"][section].update(values)
        return type(self).model_validate(data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file) is loaded first and this
    file's sections are merged over it, key by key."""
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: `base` includes form a cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    try:
        data = read_yaml(path)
    except DataFormatError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _deep_merge(_read_config_file(path.parent / base, (*chain, resolved)), data)


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """`path` when that file exists; otherwise the preset shipped with the package under the same
    name (`configs/opv2v/max.yaml`, `opv2v/max.yaml`), so installed copies find their presets from any
    folder. A name that is neither is an error listing the presets."""
    given = Path(path)
    if given.is_file():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    if parts and not given.is_absolute():
        packaged = PACKAGED_CONFIGS.joinpath(*parts)
        if packaged.is_file():
            return packaged
    presets = sorted(str(p.relative_to(PACKAGED_CONFIGS)) for p in PACKAGED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"{given}: config file does not exist (nor is it a shipped preset: {', '.join(presets)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config (or defaults when `path` is None) and apply overrides."""
    source = str(path) if path is not None else "<defaults>"
    data = _read_config_file(resolve_config_path(path)) if path is not None else {}
    return config_from_dict(data, overrides, source)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> ExperimentConfig:
    """Validate a config mapping (e.g. the one a checkpoint stores) after applying overrides."""
    data = apply_overrides(copy.deepcopy(data), overrides or [])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None
