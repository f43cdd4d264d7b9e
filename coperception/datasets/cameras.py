"""One view's camera images with their calibration, as the data pipeline hands them to a camera encoder.

The calibration follows every move of the view's frame: a scene augmentation (rotation, scaling and an
optional mirror of the whole scene) and the moves of the collation (z lift, projection into the ego
frame). A mirrored scene is what a camera at the mirrored place sees in the mirrored image, so a mirror
flips each image left-right and reflects its principal point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from coperception.datasets.types import Camera, project
from coperception.errors import DataFormatError

# OpenCV camera axes mirrored left-right (x right -> x left)
_MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])


@dataclass
class CameraViews:
    """The cameras of one view: images (M, H, W, 3) uint8, intrinsics (M, 3, 3) of the images as they
    are here, T_frame_from_camera (M, 4, 4) from OpenCV camera axes to the frame the view is in."""

    images: np.ndarray
    intrinsics: np.ndarray
    T_frame_from_camera: np.ndarray
    depth_bins: np.ndarray | None = None  # (M, h, w) training depth target per feature pixel, -1 where none

    @classmethod
    def from_cameras(cls, cameras: Sequence[Camera], size: tuple[int, int], agent_id: str) -> "CameraViews":
        """An agent's cameras, each image resized to `size` (width, height) and its intrinsics scaled alike."""
        if not cameras:
            raise DataFormatError(agent_id, "the agent carries a camera (dataset.sensors) but its frame lists none")
        width, height = size
        images, intrinsics = [], []
        for camera in cameras:
            if camera.image is None:
                raise DataFormatError(camera.image_path, "camera image was not read (dataset.sensors/load_cameras)")
            h, w = camera.image.shape[:2]
            image = camera.image
            if (w, h) != (width, height):
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
            K = np.asarray(camera.intrinsics, dtype=np.float64).copy()
            K[0] *= width / w  # continuous pixel coordinates with edges at 0 scale with the size
            K[1] *= height / h
            images.append(image)
            intrinsics.append(K)
        return cls(np.stack(images), np.stack(intrinsics),
                   np.stack([np.asarray(c.T_agent_from_camera, dtype=np.float64) for c in cameras]))

    def moved(self, T_new_from_frame: np.ndarray) -> "CameraViews":
        """The same cameras with the view's frame moved rigidly (images unchanged)."""
        return CameraViews(self.images, self.intrinsics, T_new_from_frame @ self.T_frame_from_camera, self.depth_bins)

    def mapped(self, M: np.ndarray) -> "CameraViews":
        """The cameras of a scene whose points were mapped by the similarity `M` (4, 4): rotation times a
        uniform scale, possibly with a mirror (negative determinant). The scaled scene seen from the scaled
        place looks the same; a mirror flips the images and their principal points."""
        A = M[:3, :3]
        scale = float(abs(np.linalg.det(A))) ** (1.0 / 3.0)
        mirror = np.linalg.det(A) < 0
        T = np.einsum("ij,mjk->mik", M, self.T_frame_from_camera)
        if mirror:
            T = T @ _MIRROR_X
        T[:, :3, :3] /= scale
        images, K = self.images, self.intrinsics
        if mirror:
            images = np.ascontiguousarray(images[:, :, ::-1])
            K = K.copy()
            K[:, 0, 2] = images.shape[2] - K[:, 0, 2]
            K[:, 0, 1] = -K[:, 0, 1]
        return CameraViews(images, K, T)  # depth targets are made after the augmentation

    def with_depth_targets(self, points: np.ndarray, stride: int, depths: Sequence[float]) -> "CameraViews":
        """These cameras with a depth target per feature pixel (`stride` x `stride` image patch): the bin of
        `depths` (equally spaced) nearest to the nearest of `points` (N, >=3, in the view's frame) that
        projects into the patch; -1 where none does or the depth is outside the bins."""
        M, H, W = self.images.shape[:3]
        h, w = H // stride, W // stride
        projected = [project(points, K, T) for K, T in zip(self.intrinsics, self.T_frame_from_camera)]
        u = np.stack([uv[:, 0] for uv, _ in projected])  # (M, N)
        v = np.stack([uv[:, 1] for uv, _ in projected])
        z = np.stack([depth for _, depth in projected])
        depths = np.asarray(depths, dtype=np.float64)
        step = (depths[-1] - depths[0]) / (len(depths) - 1)
        ok = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z >= depths[0] - step / 2) & (z < depths[-1] + step / 2)
        m_idx = np.nonzero(ok)[0]
        cell = m_idx * (h * w) + (v[ok] // stride).astype(np.int64) * w + (u[ok] // stride).astype(np.int64)
        nearest = np.full(M * h * w, np.inf)
        np.minimum.at(nearest, cell, z[ok])
        bins = np.where(np.isfinite(nearest), np.rint((nearest - depths[0]) / step), -1).astype(np.int64)
        return CameraViews(self.images, self.intrinsics, self.T_frame_from_camera, bins.reshape(M, h, w))
