"""Nothing of the ego reaches a sender but its broadcast: the pose it projects into and the filling
request it leaves out come from the packets that arrived over the channel (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coperception.comm.codecs import CODECS
from coperception.comm.kinds import MessageKind
from coperception.comm.wire import Message, decode_packets, encode_message
from coperception.config import ChannelConfig, CommConfig, SelectionSettings, load_config
from coperception.datasets.collate import AgentInput, PreparedSample, Projector
from coperception.datasets.voxelize import voxelize
from coperception.geometry import invert
from coperception.grid import BEVGrid
from coperception.pipeline.agent import AgentSide
from coperception.pipeline.session import CommSession, HeardBroadcast, pose_ahead

CFG = load_config(None, [])
GRID = BEVGrid.from_range(CFG.dataset.point_cloud_range, CFG.model.voxel_size[0])  # the pillar grid
EGO, SENDER = 7, 11


def pose(x: float, y: float, yaw_deg: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    T[:2, :2] = [[c, -s], [s, c]]
    T[:2, 3] = x, y
    return T


def voxels_of(points: np.ndarray):
    return voxelize(points, CFG.dataset.point_cloud_range, CFG.model.voxel_size, CFG.model.max_points_per_voxel,
                    CFG.model.max_voxels, np.random.default_rng(0))


RNG = np.random.default_rng(3)
SENDER_POINTS = np.column_stack([RNG.uniform(-30, 30, 3000), RNG.uniform(-30, 30, 3000), np.full(3000, -1.0),
                                 np.ones(3000)]).astype(np.float32)
EGO_POINTS = np.column_stack([RNG.uniform(-30, 30, 500), RNG.uniform(-20, 20, 500), np.full(500, -1.0),
                              np.ones(500)]).astype(np.float32)
SENDER_POSE = pose(15.0, 4.0, 30.0)


def sample(frame: int, T_world_from_ego: np.ndarray) -> PreparedSample:
    t = 0.1 * frame
    ego = AgentInput(voxels_of(EGO_POINTS), np.eye(4), 0, 0.0, EGO, t, T_world_from_ego, T_world_from_ego)
    sender = AgentInput(voxels_of(SENDER_POINTS), invert(T_world_from_ego) @ SENDER_POSE, 0, 0.0, SENDER, t,
                        SENDER_POSE, SENDER_POSE, SENDER_POINTS)
    return PreparedSample([ego, sender], np.zeros((0, 7)), None, f"scn/{frame:06d}", [])


class Recorder:
    """A stand-in encoder: channel 0 is the pillar occupancy (scaled by `ego_scale` for the ego's view),
    so a sender's features show where its points went; it remembers every sender view it encoded."""

    def __init__(self, ego_scale: float = 1.0):
        self.ego_scale = ego_scale
        self.sender_views: list[AgentInput] = []

    def __call__(self, views: list[AgentInput]) -> torch.Tensor:
        feats = torch.zeros(len(views), 2, GRID.height, GRID.width)
        for k, view in enumerate(views):
            c = torch.from_numpy(view.voxels.coords.astype(np.int64))
            feats[k, 0, c[:, 1], c[:, 2]] = self.ego_scale if view.sender == EGO else 1.0
            if view.sender != EGO:
                self.sender_views.append(view)
        return feats


def session(filling: bool = False, project_ahead: bool = False, **channel) -> CommSession:
    agent = AgentSide(CODECS.get("sparse")(2, CFG.comm.codebook),
                      SelectionSettings(threshold=0.5, filling=filling, request_threshold=0.5), GRID)
    cfg = CommConfig(codec="sparse", channel=ChannelConfig(**channel))
    return CommSession(agent, lambda f: f[:, 0], cfg, projector=Projector(CFG.dataset, CFG.model),
                       project_ahead=project_ahead)


def run(frames: list[np.ndarray], recorder: Recorder, **kwargs) -> CommSession:
    s = session(**kwargs)
    for frame, T in enumerate(frames):
        s.deliver(sample(frame, T), recorder)
    return s


@pytest.mark.parametrize("latency_ms", [50.0, 150.0])
def test_projection_follows_the_received_pose_not_the_egos_true_one(latency_ms):
    """Under latency the sender has only an older broadcast: its projection must not change when the
    ego's true pose at this frame changes."""
    poses = [pose(0, 0), pose(1, 0), pose(2, 0, 1)]
    other = poses[:2] + [pose(6, -3, 20)]
    a, b = Recorder(), Recorder()
    run(poses, a, latency_ms=latency_ms)
    run(other, b, latency_ms=latency_ms)
    last_a, last_b = a.sender_views[-1], b.sender_views[-1]
    assert np.array_equal(last_a.voxels.coords, last_b.voxels.coords)
    heard_frame = 1 if latency_ms < 100 else 0  # the newest broadcast that arrived within the wait
    assert np.allclose(last_a.T_world_from_frame, poses[heard_frame])


def test_projection_uses_this_frames_broadcast_when_it_arrives_in_time():
    poses = [pose(0, 0), pose(2, 0, 1)]
    other = [pose(0, 0), pose(6, -3, 20)]
    a, b = Recorder(), Recorder()
    run(poses, a)
    run(other, b)
    assert not np.array_equal(a.sender_views[-1].voxels.coords, b.sender_views[-1].voxels.coords)
    assert np.allclose(b.sender_views[-1].T_world_from_frame, other[1])
    # the projection is the sender's own: its points land where its pose puts them in the heard ego frame
    T = invert(other[1]) @ SENDER_POSE
    moved = SENDER_POINTS[:, :3] @ T[:3, :3].T + T[:3, 3]
    cells = {(int(y), int(x)) for y, x in b.sender_views[-1].voxels.coords[:, 1:]}
    expected = {(int(np.floor((p[1] - GRID.y_min) / GRID.cell)), int(np.floor((p[0] - GRID.x_min) / GRID.cell)))
                for p in moved if GRID.x_min <= p[0] < GRID.x_max and GRID.y_min <= p[1] < GRID.y_max}
    assert cells == expected


def test_pose_ahead_predicts_the_ego_pose_of_the_frame_that_fuses_the_message():
    step = pose(1.0, 0.05, 2.0)  # the ego's move per 100 ms frame: 10 m/s, turning at 20 deg/s
    at = [np.linalg.matrix_power(step, k) for k in range(6)]
    heard = [HeardBroadcast(0.1 * k, at[k], 0.1 * k + 0.15) for k in (0, 1)]  # 150 ms on the link
    # sent at 0.2 s it arrives at 0.35 s: the ego frame of 0.3 s fuses it (50 ms deadline)
    np.testing.assert_allclose(pose_ahead(heard, 0.2, 0.1, 0.05), at[3], atol=1e-9)
    np.testing.assert_allclose(pose_ahead(heard, 0.21, 0.1, 0.05), at[4], atol=1e-9)  # 10 ms later: the next frame
    fast = [HeardBroadcast(0.1 * k, at[k], 0.1 * k + 0.001) for k in (0, 1)]
    np.testing.assert_array_equal(pose_ahead(fast, 0.1, 0.1, 0.05), at[1])  # fused at its own frame
    assert pose_ahead(heard[1:], 0.2, None, 0.05) is heard[1].pose  # one broadcast: nothing to predict from
    straight = [pose(10 * t, 0.5 * t) for t in (0.0, 0.2, 0.4)]
    gap = [HeardBroadcast(0.0, straight[0], 0.15), HeardBroadcast(0.2, straight[1], 0.35)]  # one lost between
    np.testing.assert_allclose(pose_ahead(gap, 0.3, 0.1, 0.05), straight[2], atol=1e-9)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_late_message_is_projected_into_the_ego_pose_of_the_frame_that_fuses_it(ahead):
    s = session(latency_ms=150.0, project_ahead=ahead)
    held = []
    for frame in range(8):
        ego = np.linalg.matrix_power(pose(1.0, 0.1, 0.5), frame)  # steady speed and turn rate
        _, stats = s.deliver(sample(frame, ego), Recorder())
        held.extend((frame, h) for h in stats.held)
    late = [(frame, h) for frame, h in held if frame >= 5]  # messages of senders that have heard two broadcasts
    assert late and all(h.age_s == pytest.approx(0.2) for _, h in late)
    for frame, h in late:  # projected ahead, each lies in the ego frame that fuses it: nothing left to warp
        assert np.allclose(h.T_ego_from_frame, np.eye(4), atol=1e-6) == ahead


def test_before_any_broadcast_arrives_the_sender_stays_in_its_own_frame():
    rec = Recorder()
    run([pose(0, 0)], rec, latency_ms=50.0)
    view = rec.sender_views[0]
    assert view.points is not None and np.allclose(view.T_world_from_frame, SENDER_POSE)


def _sent_packets(s: CommSession) -> list[bytes]:
    return [d.packet for tx in s.queues[("scn", SENDER)] for d in tx.deliveries]


def test_senders_select_from_the_request_bits_they_received():
    """Two ego confidence maps with the same request bits give the same sender packets; an ego that
    requests nothing makes the sender send more."""
    frames = [pose(0, 0), pose(1, 0)]
    loud, soft, quiet = (run(frames, Recorder(scale), filling=True) for scale in (0.9, 0.6, 0.3))
    assert _sent_packets(loud) == _sent_packets(soft)
    sent = lambda s: sum(len(decode_packets([p]).cells) for p in _sent_packets(s))  # noqa: E731
    assert sent(quiet) > sent(loud)


def test_the_broadcast_is_counted_and_delivered_like_any_message():
    s = session(latency_ms=20.0)
    _, first = s.deliver(sample(0, pose(0, 0)), Recorder())
    pose_only = encode_message(Message(MessageKind.REQUEST, EGO, 1, 0.0, pose(0, 0), GRID, np.zeros(0, np.int64)))
    assert first.broadcast_bytes == sum(len(p) for p in pose_only)
    tx = s.broadcasts[("scn", SENDER)][-1]
    assert tx.deliveries[0].arrival_time == pytest.approx(0.020, abs=1e-3)
    # a sender that waited in vain for it (20 ms > 10 ms) leaves at the end of its wait
    sent = s.queues[("scn", SENDER)][-1]
    assert sent.deliveries[0].arrival_time >= 0.010 + 0.020
    lost = session(loss_rate=1.0)
    _, frame = lost.deliver(sample(0, pose(0, 0)), Recorder())
    assert frame.broadcast_bytes == first.broadcast_bytes  # sent (and counted) even when nobody hears it
