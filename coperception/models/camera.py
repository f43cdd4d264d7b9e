"""Camera BEV encoder (lift-splat, after Philion & Fidler's LSS), registered as `lss`.

Each image goes through a small CNN trained from scratch; every feature pixel predicts a categorical
depth over `model.camera.depth_bins` bins and a context vector. The context is lifted along the pixel's
ray, weighted by each depth's probability, to 3D points placed with the image's intrinsics and its
camera's pose in the view's frame, and summed into the cells of the same BEV grid the LiDAR encoders
use (one `index_add_`, no Python loop over points). All cameras of a view land on that view's map,
which then goes through the PointPillars BEV backbone, so a camera agent's features share the grid and
channels of every other agent.
"""

from __future__ import annotations

import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.grid import BEVGrid
from coperception.models.encoder_base import ENCODERS, BEVEncoder, input_grid
from coperception.types import AgentBatch

IMAGE_MEAN, IMAGE_STD = 0.45, 0.25  # RGB in [0, 1] brought near zero mean, unit spread


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImageBackbone(nn.Module):
    """(M, 3, H, W) -> (M, channels, H / stride, W / stride): strided 3x3 conv stages, then dilated
    convs for context at the output stride."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        widths = [32, channels // 2, channels] if stride == 8 else [32, channels]
        layers, cin = [], 3
        for w in widths:
            layers += [_conv(cin, w, stride=2), _conv(w, w)]
            cin = w
        layers += [_conv(cin, cin, dilation=2), _conv(cin, cin, dilation=4)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def frustum_points(intrinsics: torch.Tensor, T_view_from_camera: torch.Tensor, depths: torch.Tensor,
                   height: int, width: int, stride: int) -> torch.Tensor:
    """(M, D, h, w, 3) points in the view's frame: for every feature pixel (the centre of its
    `stride` x `stride` image patch) and every depth (metres along the optical axis)."""
    device, dtype = intrinsics.device, intrinsics.dtype
    v = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
    u = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pixels = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)  # (h, w, 3)
    rays = torch.einsum("mij,hwj->mhwi", torch.linalg.inv(intrinsics), pixels)  # z = 1 on the optical axis
    cam = rays[:, None] * depths.to(device=device, dtype=dtype)[None, :, None, None, None]  # (M, D, h, w, 3)
    R, t = T_view_from_camera[:, :3, :3], T_view_from_camera[:, :3, 3]
    return torch.einsum("mij,mdhwj->mdhwi", R, cam) + t[:, None, None, None, :]


def splat(depth: torch.Tensor, context: torch.Tensor, points: torch.Tensor, view: torch.Tensor, n_views: int,
          grid: BEVGrid, z_range: tuple[float, float]) -> torch.Tensor:
    """Sum the lifted features into BEV: depth (M, D, h, w) probabilities, context (M, C, h, w), points
    (M, D, h, w, 3) in the view frame, view (M,) slot of each image -> (n_views, C, grid.height, grid.width).
    Points outside the grid or the z range are dropped."""
    M, D, h, w = depth.shape
    C = context.shape[1]
    lifted = depth[:, :, None] * context[:, None]  # (M, D, C, h, w)
    lifted = lifted.permute(0, 1, 3, 4, 2).reshape(-1, C)
    col = torch.floor((points[..., 0] - grid.x_min) / grid.cell).long()
    row = torch.floor((points[..., 1] - grid.y_min) / grid.cell).long()
    z = points[..., 2]
    inside = (col >= 0) & (col < grid.width) & (row >= 0) & (row < grid.height) & (z >= z_range[0]) & (z < z_range[1])
    slot = view.to(depth.device)[:, None, None, None].expand(M, D, h, w)
    flat = (slot * grid.cells + row * grid.width + col).reshape(-1)
    keep = inside.reshape(-1)
    canvas = lifted.new_zeros(n_views * grid.cells, C)
    canvas.index_add_(0, flat[keep], lifted[keep])
    return canvas.view(n_views, grid.height, grid.width, C).permute(0, 3, 1, 2).contiguous()


def depth_loss(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the depth logits (M, D, h, w) against target bins (M, h, w), -1 ignored; zero
    (with a gradient path) when no pixel has a target."""
    if not bool((bins >= 0).any()):
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, bins.to(logits.device), ignore_index=-1)


@ENCODERS.register("lss")
class LiftSplatEncoder(BEVEncoder):
    """Images -> categorical depth x context -> lifted along the rays -> summed into BEV -> 2D backbone."""

    inputs = ("cameras",)

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        r, self.input_grid = input_grid(mcfg, dcfg)
        settings = mcfg.camera
        self.z_range = (r[2], r[5])
        self.stride = settings.stride
        self.register_buffer("depths", torch.tensor(settings.depth_centres(), dtype=torch.float32), persistent=False)
        self.image_net = ImageBackbone(settings.image_channels, settings.stride)
        self.channels = mcfg.pfn_channels  # what the BEV backbone takes, as from the pillar net
        self.depth_context = nn.Conv2d(settings.image_channels, settings.depth_bins + self.channels, 1)
        self.add_backbone(self.channels, mcfg, r)
        self.depth_loss_weight = settings.depth_loss_weight
        self._pending_loss: torch.Tensor | None = None

    def depth_and_context(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, 3, H, W) uint8 -> depth logits (M, D, h, w) and context (M, C, h, w)."""
        x = (images.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD
        out = self.depth_context(self.image_net(x))
        D = len(self.depths)
        return out[:, :D], out[:, D:]

    def take_training_loss(self) -> torch.Tensor | None:
        loss, self._pending_loss = self._pending_loss, None
        return loss

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        self.check_inputs(batch)
        cams = batch.cameras
        assert cams is not None
        logits, context = self.depth_and_context(cams.images)
        if self.training and self.depth_loss_weight > 0 and cams.depth_bins is not None:
            loss = self.depth_loss_weight * depth_loss(logits, cams.depth_bins)
            self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss
        depth = logits.softmax(dim=1)
        points = frustum_points(cams.intrinsics, cams.T_view_from_camera, self.depths, depth.shape[2], depth.shape[3],
                                self.stride)
        bev = splat(depth, context, points, cams.view, batch.n_agents, self.input_grid, self.z_range)
        return self.on_grid(self.backbone(bev))
