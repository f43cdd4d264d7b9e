"""Residual multi-codebook VQ: codes round trip, learning, dead-code re-seeding, straight-through gradients."""

from __future__ import annotations

import numpy as np
import torch

from coperception.comm.codebook import ResidualVQ
from coperception.grid import BEVGrid
from coperception.comm.wire import Message, MessageKind, decode_packets, encode_message


def clustered(n, channels, clusters, generator, spread=0.05):
    centres = torch.randn(clusters, channels, generator=generator)
    pick = torch.randint(0, clusters, (n,), generator=generator)
    return centres[pick] + spread * torch.randn(n, channels, generator=generator)


def test_training_learns_the_data_and_codes_rebuild_it_on_the_receiver():
    g = torch.Generator().manual_seed(0)
    vq = ResidualVQ(channels=32, segments=4, stages=2, codes=16, decay=0.9)
    data = clustered(4096, 32, 12, g)
    vq.train()
    for _ in range(30):
        batch = data[torch.randint(0, len(data), (512,), generator=g)]
        vq(batch, generator=g)
    vq.eval()
    out = vq(data)
    mse = (out.quantized - data).pow(2).mean() / data.var()
    assert mse < 0.05
    assert out.codes.shape == (4096, 4, 2) and out.codes.min() >= 0 and out.codes.max() < 16
    # what the ego rebuilds from the integer codes equals the sender's quantized features
    torch.testing.assert_close(vq.decode(vq.encode(data)), out.quantized)
    # ... also after the codes went through the wire
    cells = np.arange(4096, dtype=np.int64)
    msg = Message(MessageKind.CODES, 1, 0, 0.0, np.eye(4), BEVGrid(0, 0, 1, 64, 64), cells,
                  codes=out.codes.numpy(), bits=vq.bits, codebook_hash=vq.digest())
    received = decode_packets(encode_message(msg), codebook_hash=vq.digest())
    torch.testing.assert_close(vq.decode(torch.from_numpy(received.codes)), out.quantized)
    # a second residual stage lowers the error of the first
    first_only = vq._lookup(0, out.codes[..., 0]).reshape(-1, 32)
    assert (first_only - data).pow(2).mean() > (out.quantized - data).pow(2).mean()


def test_dead_codes_are_reseeded_from_the_batch():
    g = torch.Generator().manual_seed(1)
    vq = ResidualVQ(channels=8, segments=2, stages=1, codes=8, decay=0.5, dead_usage=0.05)
    vq.train()
    batch = clustered(256, 8, 2, g)
    vq(batch, generator=g)
    far = torch.full((2, 8, 4), 1e3)
    vq.codebook[:, 0] = far  # no vector is near any code -> all but the nearest go unused
    vq.ema_count.fill_(0.0)
    before = vq.digest()
    vq(batch, generator=g)
    assert (vq.codebook[:, 0].abs() < 100).all()  # every dead code now sits on a data vector
    assert vq.digest() != before
    assert vq.usage().shape == (2, 1)


def test_straight_through_gradient_and_commitment_loss():
    g = torch.Generator().manual_seed(2)
    vq = ResidualVQ(channels=16, segments=2, stages=2, codes=4)
    vq.train()
    x = clustered(64, 16, 3, g).requires_grad_(True)
    out = vq(x, generator=g)
    (out.quantized.sum() + out.commitment_loss).backward()
    expected = torch.ones_like(x) + 2 * vq.commitment * (x - out.quantized.detach()) / x.numel()
    torch.testing.assert_close(x.grad, expected)
    assert out.commitment_loss > 0


def test_kmeans_fit_beats_codes_drawn_from_one_batch_and_tolerates_few_vectors():
    g = torch.Generator().manual_seed(3)
    data = clustered(4096, 16, 64, g, spread=0.1)
    drawn = ResidualVQ(channels=16, segments=1, stages=1, codes=64)
    drawn.fit(data[:64], iterations=1, generator=g)  # what training's first batch alone would give
    fitted = ResidualVQ(channels=16, segments=1, stages=1, codes=64)
    error = fitted.fit(data, iterations=25, generator=g)

    def relative(vq):
        return float((vq.decode(vq.encode(data)) - data).pow(2).sum() / data.pow(2).sum())

    assert abs(error - relative(fitted)) < 1e-4  # the returned error is the reconstruction error
    assert relative(fitted) < 0.5 * relative(drawn)
    assert bool(fitted.initialised)
    few = ResidualVQ(channels=16, segments=2, stages=2, codes=64)
    few.fit(data[:10], generator=g)  # fewer vectors than codes: duplicated codes, no error
    assert torch.isfinite(few.codebook).all()
