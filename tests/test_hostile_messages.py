"""A sender with a valid key that sends broken or hostile bytes: every decoded message is validated
against what the receiver can use, a bad message drops only its sender, and nothing non-finite
reaches fusion (issue 13, first part)."""

from __future__ import annotations

import hashlib
import hmac
import resource
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coperception.comm.kinds import MalformedMessage
from coperception.comm.wire import (_CRC, _HEADER, _MAC, FLAG_HMAC, FLAG_VARINT, MAX_PACKET_BYTES, Expected, Message, MessageKind,
                                    assemble, codebook_digest, decode_packet, decode_packets, encode_message)
from coperception.grid import BEVGrid

GRID = BEVGrid(-140.8, -40.0, 1.6, 50, 176)
HASH = codebook_digest(np.arange(6.0))
KEY = b"k" * 32
CODES_EXPECTED = Expected(GRID, (MessageKind.CODES,), segments=4, stages=2, bits=4, codebook_hash=HASH)
FP32_EXPECTED = Expected(GRID, (MessageKind.SPARSE_FP32,), channels=8)
FIELDS = ("magic version kind flags bits sender sequence index count time tx ty tz qx qy qz qw x_min y_min cell height "
          "width hash segments stages channels start length n_cells index_len").split()


def codes_message(rng, n=60, sender=3, bits=4):
    cells = np.sort(rng.choice(GRID.cells, size=n, replace=False)).astype(np.int64)
    return Message(MessageKind.CODES, sender, 17, 12.35, np.eye(4), GRID, cells,
                   codes=rng.integers(0, 2**bits, size=(n, 4, 2)), bits=bits, codebook_hash=HASH)


def fp32_message(rng, n=30, channels=8, sender=3):
    cells = np.sort(rng.choice(GRID.cells, size=n, replace=False)).astype(np.int64)
    return Message(MessageKind.SPARSE_FP32, sender, 5, 3.0, np.eye(4), GRID, cells,
                   values=rng.normal(size=(n, channels)).astype(np.float32))


def reseal(body: bytes, key: bytes | None = KEY) -> bytes:
    """A tampered packet made valid again by its (malicious) sender: new CRC, new HMAC with its own key."""
    body = body + struct.pack("<I", zlib.crc32(body))
    return body + hmac.new(key, body, hashlib.sha256).digest() if key else body


def with_field(packet: bytes, name: str, value, key: bytes | None = KEY, body_tail: bytes | None = None) -> bytes:
    """`packet` with one header field replaced (and optionally another index+payload section), re-signed."""
    mac = _MAC if _HEADER.unpack_from(packet)[3] & FLAG_HMAC else 0
    fields = list(_HEADER.unpack_from(packet))
    fields[FIELDS.index(name)] = value
    rest = packet[_HEADER.size : len(packet) - _CRC - mac] if body_tail is None else body_tail
    return reseal(_HEADER.pack(*fields) + rest, key)


def decode(packet: bytes, expected: Expected = CODES_EXPECTED):
    return decode_packet(packet, keys={3: KEY}, require_auth=True, expected=expected)


@pytest.fixture()
def signed():
    return encode_message(codes_message(np.random.default_rng(0)), key=KEY)


def test_a_resealed_untampered_packet_still_decodes(signed):
    assert len(decode(with_field(signed[0], "sender", 3)).cells) == 60


@pytest.mark.parametrize("name, value, field", [
    ("time", float("nan"), "capture time"), ("time", float("inf"), "capture time"),
    ("tx", float("nan"), "pose"), ("qw", float("inf"), "pose"),
    ("cell", float("nan"), "grid"), ("cell", 0.0, "grid"), ("cell", -1.6, "grid"),
    ("height", 65535, "grid"), ("width", 65535, "grid"),  # a claimed 65535 x 65535 grid
    ("bits", 5, "bits"), ("segments", 5, "segments"), ("stages", 3, "stages"),
    ("kind", int(MessageKind.SPARSE_FP32), "kind"),
    ("n_cells", 10**9, "cells"), ("length", 2**32 - 1, "cells"), ("start", GRID.cells - 1, "cells"),
])
def test_resigned_headers_that_do_not_fit_the_receiver_are_rejected_by_name(signed, name, value, field):
    with pytest.raises(MalformedMessage, match=field):
        decode(with_field(signed[0], name, value))


def test_duplicate_unordered_or_overflowing_varint_indices_are_rejected():
    msg = codes_message(np.random.default_rng(1), n=3)
    msg.cells = np.array([100, 101, 103])
    packet = encode_message(msg, key=KEY)[0]
    index_len = _HEADER.unpack_from(packet)[FIELDS.index("index_len")]
    payload = packet[_HEADER.size + index_len : len(packet) - _CRC - _MAC]

    def forge(deltas: list[int]) -> bytes:
        index = b"".join(_varint(v) for v in deltas)
        forged = with_field(packet, "index_len", len(index), body_tail=index + payload)
        return with_field(with_field(forged, "flags", FLAG_VARINT | FLAG_HMAC), "length", 4)

    np.testing.assert_array_equal(decode(forge([0, 1, 2])).cells, [100, 101, 103])  # the forgery itself works
    for deltas in ([0, 1, 0], [0, 0, 2], [5, 1, 2], [0, 1, 9], [0, 2**62, 2**62]):  # duplicate, off-start, past range, overflow
        with pytest.raises(MalformedMessage, match="cells"):
            decode(forge(deltas))


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
        v >>= 7
        if not v:
            return bytes(out)


def test_channels_and_non_finite_values_of_fp32_cells_are_rejected():
    packet = encode_message(fp32_message(np.random.default_rng(2)), key=KEY)[0]
    assert decode(packet, FP32_EXPECTED).values.shape == (30, 8)
    with pytest.raises(MalformedMessage, match="channels"):
        decode(with_field(packet, "channels", 9), FP32_EXPECTED)
    msg = fp32_message(np.random.default_rng(2))
    msg.values[4, 2] = np.nan
    with pytest.raises(MalformedMessage, match="values"):
        decode(encode_message(msg, key=KEY)[0], FP32_EXPECTED)
    other = Expected(GRID, (MessageKind.SPARSE_FP32,), channels=9)
    with pytest.raises(MalformedMessage, match="channels"):
        decode(packet, other)


def test_oversized_packets_are_refused_before_anything_is_allocated(signed):
    big = with_field(signed[0], "n_cells", 1, body_tail=b"\0" * (MAX_PACKET_BYTES + 10))
    with pytest.raises(MalformedMessage, match="larger than"):
        decode(big)


def test_packets_of_one_message_that_disagree_are_not_assembled():
    rng = np.random.default_rng(3)
    a = encode_message(codes_message(rng, n=600), mtu=400, key=KEY)
    assert len(a) > 2
    packets = [decode(p) for p in a]
    odd = decode(with_field(a[1], "tx", 5.0))  # the same message, another pose
    with pytest.raises(MalformedMessage, match="disagree"):
        assemble([packets[0], odd])
    assert len(assemble(packets[:2]).cells) == len(packets[0].cells) + len(packets[1].cells)
    replay_other = decode(encode_message(codes_message(rng, n=600), mtu=400, key=KEY)[1])  # same ids, other cells
    with pytest.raises(MalformedMessage):
        assemble([packets[1], replay_other])


def test_fuzzed_packets_raise_only_message_errors_and_nothing_invalid_is_accepted():
    """>= 100,000 mutated packets (bit flips, truncation, and re-signed header and section edits a
    malicious sender with a valid key could send): only `MalformedMessage` is raised, and every
    packet that decodes satisfies the receiver's expectations."""
    rng = np.random.default_rng(7)
    bases = [(p, CODES_EXPECTED) for p in encode_message(codes_message(rng, n=300), mtu=600, key=KEY)]
    bases += [(p, FP32_EXPECTED) for p in encode_message(fp32_message(rng, n=40), mtu=600, key=KEY)]
    request = Message(MessageKind.REQUEST, 3, 9, 1.0, np.eye(4), GRID, np.sort(rng.choice(GRID.cells, 80, replace=False)))
    bases += [(p, Expected(GRID, (MessageKind.REQUEST,))) for p in encode_message(request, key=KEY)]
    specials = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 255, 256, 65535, 2**31 - 1, 2**32 - 1]
    floats = [0.0, -0.0, 1e-30, -1.0, 1e30, float("nan"), float("inf"), float("-inf")]
    started, rss_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = {"accepted": 0, "rejected": 0}
    total, i = 100_000, -1
    while counts["accepted"] + counts["rejected"] < total:
        i += 1
        packet, expected = bases[i % len(bases)]
        mode = i % 4
        if mode == 0:  # bit flips in transit (no re-signing)
            data = bytearray(packet)
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                data[pos] ^= 1 << int(rng.integers(0, 8))
            data = bytes(data)
        elif mode == 1:  # truncated or extended
            data = packet[: int(rng.integers(0, len(packet)))] if i % 8 == 1 else packet + rng.bytes(int(rng.integers(1, 50)))
        else:  # a malicious sender: edit header fields or sections, then sign
            fields = list(_HEADER.unpack_from(packet))
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(1, len(fields)))
                old = fields[k]
                if isinstance(old, float):
                    fields[k] = floats[int(rng.integers(len(floats)))]
                elif isinstance(old, bytes):
                    fields[k] = rng.bytes(len(old))
                else:
                    fields[k] = specials[int(rng.integers(len(specials)))]
                    if k == FIELDS.index("sender"):
                        fields[k] = int(np.clip(fields[k], -2**31, 2**31 - 1))
            try:
                header = _HEADER.pack(*fields)
            except struct.error:  # a value the field cannot hold: not a packet anyone can send
                continue
            mac = _MAC if fields[3] & FLAG_HMAC else 0
            rest = bytearray(packet[_HEADER.size : len(packet) - _CRC - _MAC])
            if mode == 3 and rest:
                for pos in rng.integers(0, len(rest), size=int(rng.integers(1, 4))):
                    rest[pos] = int(rng.integers(0, 256))
            data = reseal(header + bytes(rest), KEY if mac else None)
        try:
            got = decode_packet(data, keys={3: KEY}, require_auth=bool(i % 3), expected=expected)
        except MalformedMessage:
            counts["rejected"] += 1
            continue
        counts["accepted"] += 1
        _assert_usable(got, expected)
    seconds = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"fuzz: {total} packets in {seconds:.1f} s, {counts}, peak RSS grew {grown_mb:.0f} MB "
          f"(process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    assert counts["accepted"] > 1000 and counts["rejected"] > 50_000
    assert seconds < 120 and grown_mb < 200


def _assert_usable(p, expected: Expected) -> None:
    assert p.kind in expected.kinds and np.isfinite(p.capture_time) and np.isfinite(p.pose).all()
    assert np.allclose(p.pose[:3, :3] @ p.pose[:3, :3].T, np.eye(3), atol=1e-5)
    assert (p.grid.height, p.grid.width) == (GRID.height, GRID.width)
    cells = p.cells
    assert cells.dtype == np.int64 and (cells >= 0).all() and (cells < GRID.cells).all()
    assert (np.diff(cells) > 0).all()
    if p.kind == MessageKind.CODES:
        assert p.codes.shape == (len(cells), expected.segments, expected.stages) and p.bits == expected.bits
        assert (p.codes >= 0).all() and (p.codes < 2**expected.bits).all()
    elif p.kind == MessageKind.SPARSE_FP32:
        assert p.values.shape == (len(cells), expected.channels) and np.isfinite(p.values).all()
    else:
        assert p.codes is None and p.values is None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 900), bits=st.integers(1, 16), m=st.integers(1, 4), r=st.integers(1, 3),
       mtu=st.integers(300, 3000), seed=st.integers(0, 2**32 - 1), signed=st.booleans())
def test_encode_then_decode_gives_the_message_back(n, bits, m, r, mtu, seed, signed):
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(GRID.cells, size=n, replace=False)).astype(np.int64)
    msg = Message(MessageKind.CODES, -2, seed % 1000, float(seed % 97) / 7, np.eye(4), GRID, cells,
                  codes=rng.integers(0, 2**bits, size=(n, m, r)), bits=bits, codebook_hash=HASH)
    key = KEY if signed else None
    try:
        packets = encode_message(msg, mtu=mtu, key=key)
    except ValueError:  # one cell does not fit this MTU: the encoder says so
        assert (m * r * bits + 7) // 8 + _HEADER.size + _CRC + (_MAC if signed else 0) + 9 > mtu
        return
    expected = Expected(GRID, (MessageKind.CODES,), segments=m, stages=r, bits=bits, codebook_hash=HASH)
    out = decode_packets(packets, keys={-2: KEY}, require_auth=signed, expected=expected)
    np.testing.assert_array_equal(out.cells, cells)
    np.testing.assert_array_equal(out.codes.reshape(n, m, r), msg.codes)
    assert out.sender == -2 and out.capture_time == msg.capture_time and out.packets_received == len(packets)


def test_non_finite_sender_values_never_wipe_the_egos_own_feature():
    from coperception.fusion.base import FusionMeta, build_fusion

    ego = torch.tensor([1.0, -2.0, 0.5])
    features = torch.stack([ego, torch.tensor([float("nan"), float("inf"), -float("inf")])])[None, :, :, None, None]
    valid = torch.ones(1, 2, 1, 1, dtype=torch.bool)
    meta = FusionMeta(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64), torch.eye(4).repeat(1, 2, 1, 1))
    for name in ("max", "mean", "attention"):
        options = {"heads": 1, "key_channels": 4} if name == "attention" else {}
        out = build_fusion(name, 3, options)(features, valid, meta)
        torch.testing.assert_close(out[0, :, 0, 0], ego, msg=name)


def _tampered_run(opv2v_set, tmp_path, monkeypatch, tamper):
    """Evaluate an untrained sparse model over 6 frames with agent keys, the first sender's packets
    passed through `tamper(packets, msg, key, history, other senders)` on the way out."""
    import coperception.pipeline.session as session_module
    from coperception.config import load_config
    from coperception.evaluate import evaluate_method
    from coperception.pipeline.model import build_model

    from test_comm_pipeline import agent_key_file
    from test_train import TINY

    cfg = load_config(None, [f"dataset.root={opv2v_set.root}", "dataset.eval_split=test", *TINY, "comm.codec=sparse",
                             "comm.selection.threshold=0.0", "comm.selection.top_k=20",
                             f"comm.key_file={agent_key_file(opv2v_set, tmp_path / 'keys.json')}"])
    model = build_model(cfg).eval()
    clean = evaluate_method(model, cfg, "test", progress=False, limit=6)
    assert clean["rejected_messages"] == {}
    real_encode = session_module.encode_message
    history: list[list[bytes]] = []
    victim: list[int] = []
    seen: set[int] = set()

    def encode(msg, mtu, key=None):
        packets = real_encode(msg, mtu, key)
        if msg.kind == MessageKind.REQUEST or msg.sequence == 0:  # requests, and the session's MTU probe
            return packets
        seen.add(msg.sender)
        victim[:] = victim or [msg.sender]
        if msg.sender != victim[0]:
            return packets
        history.append(packets)
        return tamper(packets, msg, key, history, sorted(seen - {msg.sender}))

    monkeypatch.setattr(session_module, "encode_message", encode)
    return clean, evaluate_method(model, cfg, "test", progress=False, limit=6)


def _strip(packet: bytes) -> bytes:
    fields = list(_HEADER.unpack_from(packet))
    fields[FIELDS.index("flags")] &= ~FLAG_HMAC
    return reseal(_HEADER.pack(*fields) + packet[_HEADER.size : len(packet) - _CRC - _MAC], None)


@pytest.mark.parametrize("attack, reason", [
    ("malformed", "MalformedMessage"),  # re-signed with its own key, contents the ego cannot use
    ("stripped", "AuthenticationError"),  # signature removed
    ("forged id", "AuthenticationError"),  # claims to be another agent, signed with its own key
    ("replay", "ReplayedMessage"),  # an old message of its own sent again
    ("future", "StaleMessage"),  # a capture time ahead of the ego's clock
])
def test_a_bad_message_drops_only_its_sender_and_is_counted(opv2v_set, tmp_path, monkeypatch, attack, reason):
    def tamper(packets, msg, key, history, others):
        if attack == "malformed":
            return [with_field(p, "channels", 7, key=key) for p in packets]
        if attack == "stripped":
            return [_strip(p) for p in packets]
        if attack == "forged id":
            claimed = others[0] if others else msg.sender + 1000  # another agent of the scene, if one was seen
            return [with_field(p, "sender", claimed, key=key) for p in packets]
        if attack == "replay":
            return history[0] if len(history) > 2 else packets
        return [with_field(p, "time", msg.capture_time + 5.0, key=key) for p in packets]

    clean, hit = _tampered_run(opv2v_set, tmp_path, monkeypatch, tamper)
    assert set(hit["rejected_messages"]) == {reason} and hit["rejected_messages"][reason] >= 1
    assert hit["frames"] == 6  # the evaluation went on with the senders it trusts
    if attack != "replay":
        assert hit["mean_fused_age_s"] is not None  # the other senders were still fused


def test_old_sign_setting_says_what_replaced_it():
    from coperception.config import load_config
    from coperception.errors import ConfigError

    with pytest.raises(ConfigError, match="comm.key_file"):
        load_config(None, ["comm.sign=true"])


def test_key_files_are_validated_and_private(tmp_path):
    import json
    import os

    from coperception.comm.keys import load_keys, write_keys
    from coperception.errors import DataFormatError

    keys = write_keys(tmp_path / "k.json", [3, -1])
    assert load_keys(tmp_path / "k.json") == keys and len(set(keys.values())) == 2
    assert os.stat(tmp_path / "k.json").st_mode & 0o777 == 0o600
    for bad, message in (({"3": "abc"}, "expected an integer agent id and a hex key"), ({"x": "00" * 16}, "entry 'x'"),
                         ({"3": "00" * 8}, "at least 16"), ([], "non-empty mapping")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataFormatError, match=message):
            load_keys(tmp_path / "bad.json")
