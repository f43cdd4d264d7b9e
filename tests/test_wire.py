"""The wire format: exact round trips, packets that decode on their own, and rejection of bad bytes."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.comm.kinds import MalformedMessage
from coperception.grid import BEVGrid
from coperception.comm.wire import (AuthenticationError, CodebookMismatch, CRCError, Message, MessageKind,
                                    assemble, codebook_digest, decode_packet, decode_packets, decode_varints,
                                    encode_message, encode_varints, pack_bits, unpack_bits)

GRID = BEVGrid(-140.8, -40.0, 1.6, 50, 176)


def random_pose(rng):
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("zyx", rng.uniform(-np.pi, np.pi, 3) * [1, 0.05, 0.05]).as_matrix()
    T[:3, 3] = rng.uniform(-500, 500, 3)
    return T


def random_codes_message(rng, n_cells, m=4, r=2, bits=8, grid=GRID, sender=3):
    cells = np.sort(rng.choice(grid.cells, size=n_cells, replace=False)).astype(np.int64)
    codes = rng.integers(0, 2**bits, size=(n_cells, m, r))
    return Message(MessageKind.CODES, sender, 17, 12.35, random_pose(rng), grid, cells, codes=codes, bits=bits,
                   codebook_hash=codebook_digest(np.arange(6.0)))


def test_bit_packing_and_varints_round_trip():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 7, 8, 11, 16):
        v = rng.integers(0, 2**bits, size=1001)
        packed = pack_bits(v, bits)
        assert len(packed) == (1001 * bits + 7) // 8
        np.testing.assert_array_equal(unpack_bits(packed, 1001, bits), v)
    v = np.concatenate([[0, 1, 127, 128, 16383, 16384, 2**21, 2**35], rng.integers(0, 2**20, 500)])
    np.testing.assert_array_equal(decode_varints(encode_varints(v)), v)
    assert len(encode_varints([0, 127, 128])) == 1 + 1 + 2
    with pytest.raises(MalformedMessage):
        decode_varints(bytes([0x80]))


@pytest.mark.parametrize("n_cells,bits", [(1, 8), (37, 4), (900, 8), (4000, 6), (8800, 10)])
def test_codes_round_trip_exactly_through_packets(n_cells, bits):
    rng = np.random.default_rng(n_cells)
    msg = random_codes_message(rng, n_cells, bits=bits)
    packets = encode_message(msg, mtu=1200)
    assert all(len(p) <= 1200 for p in packets)
    out = decode_packets(packets, codebook_hash=msg.codebook_hash)
    np.testing.assert_array_equal(out.cells, msg.cells)
    np.testing.assert_array_equal(out.codes, msg.codes)
    assert out.sender == 3 and out.sequence == 17 and out.capture_time == 12.35
    assert (out.grid.height, out.grid.width) == (GRID.height, GRID.width)
    np.testing.assert_allclose([out.grid.x_min, out.grid.y_min, out.grid.cell], [GRID.x_min, GRID.y_min, GRID.cell], rtol=1e-6)
    np.testing.assert_allclose(out.pose, msg.pose, atol=1e-5)
    assert out.packets_received == out.packets_total == len(packets)


def test_index_encoding_picks_the_smaller_of_bitmap_and_varints():
    rng = np.random.default_rng(1)
    dense = random_codes_message(rng, 6000, bits=1, m=1, r=1)  # most cells: bitmap wins
    sparse = random_codes_message(rng, 20, bits=1, m=1, r=1)  # few cells: varints win
    empty = Message(MessageKind.REQUEST, 1, 1, 0.0, np.eye(4), GRID, np.zeros(0, np.int64))
    header_and_crc = len(encode_message(empty)[0])
    dense_size = sum(len(p) for p in encode_message(dense, mtu=100000))
    assert dense_size <= header_and_crc + GRID.cells // 8 + 1 + 6000 // 8 + 1
    sparse_size = sum(len(p) for p in encode_message(sparse, mtu=100000))
    assert sparse_size <= header_and_crc + 20 * 2 + 3 + 3  # ~2 bytes per delta, far below a bitmap


def test_sparse_fp32_and_request_round_trip():
    rng = np.random.default_rng(2)
    cells = np.sort(rng.choice(GRID.cells, 300, replace=False))
    values = rng.normal(size=(300, 96)).astype(np.float32)
    msg = Message(MessageKind.SPARSE_FP32, -548, 4, 1.0, np.eye(4), GRID, cells, values=values)  # RSU ids are negative
    out = decode_packets(encode_message(msg))
    assert out.sender == -548
    np.testing.assert_array_equal(out.values, values)
    np.testing.assert_array_equal(out.cells, cells)
    req = Message(MessageKind.REQUEST, 0, 4, 1.0, np.eye(4), GRID, cells)
    np.testing.assert_array_equal(decode_packets(encode_message(req)).cells, cells)


def test_a_lost_packet_removes_exactly_its_cells():
    rng = np.random.default_rng(3)
    msg = random_codes_message(rng, 3000)
    packets = encode_message(msg, mtu=600)
    assert len(packets) > 4
    decoded = [decode_packet(p) for p in packets]
    lost = 2
    out = assemble([d for k, d in enumerate(decoded) if k != lost])
    missing = np.setdiff1d(msg.cells, out.cells)
    np.testing.assert_array_equal(missing, decoded[lost].cells)
    keep = np.isin(msg.cells, out.cells)
    np.testing.assert_array_equal(out.codes, msg.codes[keep])
    assert out.packets_received == len(packets) - 1


def test_wrong_codebook_bad_crc_and_wrong_hmac_key_are_rejected():
    rng = np.random.default_rng(4)
    msg = random_codes_message(rng, 200)
    packet = encode_message(msg)[0]
    with pytest.raises(CodebookMismatch, match="codebook"):
        decode_packet(packet, codebook_hash=codebook_digest(np.arange(7.0)))
    corrupted = bytearray(packet)
    corrupted[len(packet) // 2] ^= 0x10
    with pytest.raises(CRCError, match="CRC32"):
        decode_packet(bytes(corrupted))
    keys = {3: b"key-of-agent-3", 4: b"key-of-agent-4"}
    signed = encode_message(msg, key=keys[3])
    assert decode_packets(signed, keys=keys).codes.shape == msg.codes.shape
    with pytest.raises(AuthenticationError, match="does not verify"):
        decode_packets(signed, keys={3: keys[4]})
    with pytest.raises(AuthenticationError, match="no key"):
        decode_packets(signed, keys={})
    with pytest.raises(AuthenticationError, match="not signed"):
        decode_packets(encode_message(msg), keys=keys, require_auth=True)
    with pytest.raises(MalformedMessage, match="shorter"):
        decode_packet(packet[:20])
    with pytest.raises(MalformedMessage, match="magic"):
        decode_packet(b"XXXX" + packet[4:])
