"""SE(3) poses, box conversions and vectorized rotated BEV IoU.

Conventions (DESIGN §2): right-handed frames, x forward, y left, z up, metres, radians.
Boxes are `(x, y, z, l, w, h, yaw)` with z at the box centre. CARLA (OPV2V) is
left-handed; `FLIP_Y` converts between the two by mirroring y.
"""

from __future__ import annotations

import numpy as np

FLIP_Y = np.diag([1.0, -1.0, 1.0, 1.0])

# OpenCV optical axes (x right, y down, z forward) expressed in a right-handed x-forward,
# y-left, z-up body frame: T_body_from_cv.
CV_TO_BODY = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])

# Unit box corners, in the order used everywhere: bottom face then top face, each
# front-left, front-right, rear-right, rear-left (x forward, y left).
_UNIT_CORNERS = np.array(
    [
        [0.5, 0.5, -0.5],
        [0.5, -0.5, -0.5],
        [-0.5, -0.5, -0.5],
        [-0.5, 0.5, -0.5],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [-0.5, -0.5, 0.5],
        [-0.5, 0.5, 0.5],
    ]
)


def carla_pose_to_matrix(pose: np.ndarray | list[float]) -> np.ndarray:
    """CARLA `[x, y, z, roll, yaw, pitch]` (metres, degrees) -> 4x4 transform (CARLA axes)."""
    x, y, z, roll, yaw, pitch = (float(v) for v in pose)
    r, yw, p = np.radians([roll, yaw, pitch])
    cr, sr, cy, sy, cp, sp = np.cos(r), np.sin(r), np.cos(yw), np.sin(yw), np.cos(p), np.sin(p)
    T = np.eye(4)
    T[:3, :3] = [
        [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr],
        [sp, -cp * sr, cp * cr],
    ]
    T[:3, 3] = [x, y, z]
    return T


def matrix_to_carla_pose(T: np.ndarray) -> list[float]:
    """Inverse of `carla_pose_to_matrix` (pitch kept in [-90, 90] degrees)."""
    R = T[:3, :3]
    pitch = np.arcsin(np.clip(R[2, 0], -1.0, 1.0))
    roll = np.arctan2(-R[2, 1], R[2, 2])
    yaw = np.arctan2(R[1, 0], R[0, 0])
    return [float(T[0, 3]), float(T[1, 3]), float(T[2, 3]), *np.degrees([roll, yaw, pitch]).tolist()]


def carla_to_rh(T_carla: np.ndarray) -> np.ndarray:
    """A transform between two CARLA (left-handed) frames -> the same between right-handed frames."""
    return FLIP_Y @ T_carla @ FLIP_Y


def pose_matrix(x: float, y: float, z: float, yaw: float, roll: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """Right-handed 4x4 from translation and intrinsic z-y-x (yaw, pitch, roll) angles in radians."""
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    T = np.eye(4)
    T[:3, :3] = Rz @ Ry @ Rx
    T[:3, 3] = [x, y, z]
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (or a stack of them)."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def orthonormalize(R: np.ndarray) -> np.ndarray:
    """Nearest rotation matrix (polar decomposition via SVD), determinant +1."""
    U, _, Vt = np.linalg.svd(np.asarray(R, dtype=np.float64))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    return U @ D @ Vt


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to the xyz columns of (N, >=3) points; other columns are kept."""
    out = np.array(points, copy=True)
    xyz = points[:, :3].astype(np.float64)
    out[:, :3] = xyz @ T[:3, :3].T + T[:3, 3]
    return out


def yaw_of(T: np.ndarray) -> float:
    """Heading of a transform's x axis in the target frame's xy plane."""
    return float(np.arctan2(T[1, 0], T[0, 0]))


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """Wrap to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def transform_boxes(T: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Move (N, 7) boxes by T; yaw turns by T's heading (boxes stay upright)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    out = boxes.copy()
    out[:, :3] = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
    out[:, 6] = wrap_angle(boxes[:, 6] + yaw_of(T))
    return out


def boxes_to_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 7) boxes -> (N, 8, 3) corners in the order of `_UNIT_CORNERS`."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    local = _UNIT_CORNERS[None] * boxes[:, None, 3:6]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    x = local[..., 0] * c[:, None] - local[..., 1] * s[:, None]
    y = local[..., 0] * s[:, None] + local[..., 1] * c[:, None]
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, :3]


def corners_to_boxes(corners: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners in the order of `_UNIT_CORNERS` -> (N, 7) boxes.

    That order is DAIR-V2X's `world_8_points` and OpenCOOD's: corners 0-3 the bottom face,
    4-7 the top, each face (+l,+w), (+l,-w), (-l,-w), (-l,+w). The box axes follow from the
    edges, so the heading is kept over the full circle (the length axis points from corner
    3 to corner 0) and a pitched or rolled box keeps its true size (l, w, h are the lengths
    of its own edges, not of its axis-aligned footprint). Yaw is the heading of the length
    axis in the xy plane, in [-pi, pi).
    """
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 8, 3)
    if len(corners) == 0:
        return np.zeros((0, 7))
    centre = corners.mean(axis=1)
    # each axis averaged over its four parallel edges
    along_length = (corners[:, [0, 1, 4, 5]] - corners[:, [3, 2, 7, 6]]).mean(axis=1)
    along_width = (corners[:, [0, 3, 4, 7]] - corners[:, [1, 2, 5, 6]]).mean(axis=1)
    along_height = (corners[:, 4:] - corners[:, :4]).mean(axis=1)
    length = np.linalg.norm(along_length, axis=1)
    width = np.linalg.norm(along_width, axis=1)
    height = np.linalg.norm(along_height, axis=1)
    yaw = wrap_angle(np.arctan2(along_length[:, 1], along_length[:, 0]))
    return np.column_stack([centre, length, width, height, yaw])


def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 7) boxes -> (N, 4, 2) footprint corners, counter-clockwise."""
    return boxes_to_corners(boxes)[:, [2, 1, 0, 3], :2]


def points_in_boxes(points: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """(N, >=3) points, (M, 7) boxes -> (M, N) bool: point lies inside the box (+margin)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    rel = points[None, :, :3] - boxes[:, None, :3]
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    lx = rel[..., 0] * c + rel[..., 1] * s
    ly = -rel[..., 0] * s + rel[..., 1] * c
    half = boxes[:, None, 3:6] / 2 + margin
    return (np.abs(lx) <= half[..., 0]) & (np.abs(ly) <= half[..., 1]) & (np.abs(rel[..., 2]) <= half[..., 2])


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _quad_intersection_area(pa: np.ndarray, pb: np.ndarray, eps: float) -> np.ndarray:
    """Intersection area of convex CCW quads pa, pb of shape (K, 4, 2)."""
    k = len(pa)
    # candidate vertices: corners of A inside B, corners of B inside A, edge-edge crossings
    def inside(points: np.ndarray, quad: np.ndarray) -> np.ndarray:
        edges = np.roll(quad, -1, axis=1) - quad  # (K, 4, 2)
        rel = points[:, :, None, :] - quad[:, None, :, :]  # (K, P, 4, 2)
        return (_cross2(edges[:, None], rel) >= -eps).all(axis=2)

    a_in_b = inside(pa, pb)
    b_in_a = inside(pb, pa)
    a0, a1 = pa, np.roll(pa, -1, axis=1)
    b0, b1 = pb, np.roll(pb, -1, axis=1)
    da = (a1 - a0)[:, :, None, :]  # (K, 4, 1, 2)
    db = (b1 - b0)[:, None, :, :]  # (K, 1, 4, 2)
    denom = _cross2(da, db)  # (K, 4, 4)
    diff = b0[:, None, :, :] - a0[:, :, None, :]
    safe = np.where(np.abs(denom) > 1e-12, denom, 1.0)
    t = _cross2(diff, db) / safe
    u = _cross2(diff, da) / safe
    cross_ok = (np.abs(denom) > 1e-12) & (t >= -eps) & (t <= 1 + eps) & (u >= -eps) & (u <= 1 + eps)
    cross_pts = a0[:, :, None, :] + t[..., None] * da
    pts = np.concatenate([pa, pb, cross_pts.reshape(k, 16, 2)], axis=1)  # (K, 24, 2)
    ok = np.concatenate([a_in_b, b_in_a, cross_ok.reshape(k, 16)], axis=1)
    count = ok.sum(axis=1)
    centre = (pts * ok[..., None]).sum(axis=1) / np.maximum(count, 1)[:, None]
    ang = np.arctan2(pts[..., 1] - centre[:, 1:2], pts[..., 0] - centre[:, 0:1])
    ang = np.where(ok, ang, np.inf)  # invalid points sort last
    order = np.argsort(ang, axis=1)
    pts = np.take_along_axis(pts, order[..., None], axis=1)
    ok = np.take_along_axis(ok, order, axis=1)
    first = pts[:, :1, :]
    pts = np.where(ok[..., None], pts, first)  # invalid -> copies of the first point: zero area
    area = 0.5 * _cross2(pts, np.roll(pts, -1, axis=1)).sum(axis=1)
    return np.where(count >= 3, np.abs(area), 0.0)


def rotated_iou_bev(boxes_a: np.ndarray, boxes_b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(N, 7) x (M, 7) boxes -> (N, M) IoU of their BEV footprints (vectorized).

    Pairs whose bounding circles do not touch are skipped; the rest are clipped exactly
    (convex polygon intersection from inside-corners and edge crossings).
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 7)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 7)
    iou = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return iou
    ra = 0.5 * np.hypot(a[:, 3], a[:, 4])
    rb = 0.5 * np.hypot(b[:, 3], b[:, 4])
    dist = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    ia, ib = np.nonzero(dist < ra[:, None] + rb[None, :])
    if len(ia) == 0:
        return iou
    scale = max(float(np.abs(a[:, :2]).max()), float(np.abs(b[:, :2]).max()), 1.0)
    iou[ia, ib] = pair_ious(a, bev_corners(a), b, bev_corners(b), ia, ib, 1e-9 * scale, chunk)
    return iou


def pair_ious(a: np.ndarray, corners_a: np.ndarray, b: np.ndarray, corners_b: np.ndarray, ia: np.ndarray,
              ib: np.ndarray, eps: float, chunk: int = 4096) -> np.ndarray:
    """BEV IoU of the pairs (a[ia[k]], b[ib[k]]) given the boxes and their `bev_corners`, in [0, 1]."""
    out = np.zeros(len(ia))
    for start in range(0, len(ia), chunk):
        sa, sb = ia[start : start + chunk], ib[start : start + chunk]
        # centre each pair on A's centre for numerical accuracy far from the origin
        origin = a[sa, None, :2]
        inter = _quad_intersection_area(corners_a[sa] - origin, corners_b[sb] - origin, eps)
        union = a[sa, 3] * a[sa, 4] + b[sb, 3] * b[sb, 4] - inter
        out[start : start + chunk] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return np.clip(out, 0.0, 1.0)


def in_range_mask(boxes: np.ndarray, point_range: list[float] | np.ndarray) -> np.ndarray:
    """True for boxes whose 8 corners all lie inside `[xmin, ymin, zmin, xmax, ymax, zmax]`."""
    r = np.asarray(point_range, dtype=np.float64)
    corners = boxes_to_corners(boxes)
    return ((corners >= r[:3]) & (corners <= r[3:])).all(axis=(1, 2))


def bev_in_range_mask(boxes: np.ndarray, point_range: list[float] | np.ndarray) -> np.ndarray:
    """True for boxes whose 4 BEV footprint corners all lie inside the x/y of `[xmin, ymin, _, xmax, ymax, _]`."""
    r = np.asarray(point_range, dtype=np.float64)
    corners = bev_corners(np.asarray(boxes, dtype=np.float64).reshape(-1, 7))
    return ((corners >= r[[0, 1]]) & (corners <= r[[3, 4]])).all(axis=(1, 2))


def rotated_iou_bev_aligned(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of row i of `boxes_a` with row i of `boxes_b`: (N, 7), (N, 7) -> (N,)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 7)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 7)
    if len(a) != len(b):
        raise ValueError(f"aligned IoU needs equal counts, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return np.zeros(0)
    origin = a[:, None, :2]
    scale = max(float(np.abs(a[:, :2]).max()), float(np.abs(b[:, :2]).max()), 1.0)
    inter = _quad_intersection_area(bev_corners(a) - origin, bev_corners(b) - origin, 1e-9 * scale)
    union = a[:, 3] * a[:, 4] + b[:, 3] * b[:, 4] - inter
    return np.clip(np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0), 0.0, 1.0)
