"""PCD v0.7 reading and writing: DATA ascii, binary and binary_compressed (LZF).

Reads return a numpy structured array with the file's fields. `read_lidar_points`
turns that into (N, 4) float32 `x y z intensity` with intensity in [0, 1], decoding the
two layouts the real releases use:
- OPV2V: `x y z rgb` (ascii), the float32 `rgb` packs `r << 16` and intensity = r / 255;
- DAIR-V2X: `intensity` as uint8 (vehicle side, / 255) or float in [0, 1] (infrastructure).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lzf
import numpy as np

from coperception.errors import DataFormatError
from coperception.io import atomic_write_bytes, read_bytes

_TYPE_CODES = {("F", 4): "f4", ("F", 8): "f8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4",
               ("U", 8): "u8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8"}
_HEADER_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")


@dataclass(frozen=True)
class PcdHeader:
    fields: list[str]
    sizes: list[int]
    types: list[str]
    counts: list[int]
    width: int
    height: int
    points: int
    data: str

    def dtype(self) -> np.dtype:
        parts = []
        for name, size, kind, count in zip(self.fields, self.sizes, self.types, self.counts):
            code = "<" + _TYPE_CODES[(kind, size)]
            parts.append((name, code) if count == 1 else (name, code, (count,)))
        return np.dtype(parts)


def _parse_header(raw: bytes, path: str | Path) -> tuple[PcdHeader, int]:
    values: dict[str, list[str]] = {}
    pos = 0
    while "DATA" not in values:
        end = raw.find(b"\n", pos)
        if end < 0:
            raise DataFormatError(path, "PCD header ends before its DATA line (file truncated?)")
        line = raw[pos:end].decode("ascii", errors="replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split()
        if key not in _HEADER_KEYS:
            raise DataFormatError(path, f"unknown PCD header line {line!r}")
        values[key] = rest
    missing = [k for k in ("FIELDS", "SIZE", "TYPE", "POINTS", "DATA") if k not in values]
    if missing:
        raise DataFormatError(path, f"PCD header lacks {', '.join(missing)}")
    try:
        fields = values["FIELDS"]
        sizes = [int(v) for v in values["SIZE"]]
        types = values["TYPE"]
        counts = [int(v) for v in values.get("COUNT", ["1"] * len(fields))]
        points = int(values["POINTS"][0])
        width = int(values.get("WIDTH", [points])[0])
        height = int(values.get("HEIGHT", ["1"])[0])
    except (ValueError, IndexError) as exc:
        raise DataFormatError(path, f"malformed PCD header: {exc}") from None
    if not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise DataFormatError(path, "PCD header FIELDS/SIZE/TYPE/COUNT lengths differ")
    for kind, size in zip(types, sizes):
        if (kind, size) not in _TYPE_CODES:
            raise DataFormatError(path, f"unsupported PCD field type {kind}{size}")
    data = values["DATA"][0].lower()
    if data not in ("ascii", "binary", "binary_compressed"):
        raise DataFormatError(path, f"unsupported PCD DATA {data!r}")
    return PcdHeader(fields, sizes, types, counts, width, height, points, data), pos


def read_pcd(path: str | Path) -> np.ndarray:
    """Read a PCD file into a structured array (one record per point)."""
    raw = read_bytes(path)
    header, offset = _parse_header(raw, path)
    dtype = header.dtype()
    n = header.points
    body = raw[offset:]
    if header.data == "binary":
        need = n * dtype.itemsize
        if len(body) < need:
            raise DataFormatError(path, f"binary PCD truncated: {len(body)} of {need} data bytes")
        return np.frombuffer(body, dtype=dtype, count=n).copy()
    if header.data == "binary_compressed":
        if len(body) < 8:
            raise DataFormatError(path, "binary_compressed PCD truncated before its size words")
        comp_size, raw_size = (int(v) for v in np.frombuffer(body[:8], dtype="<u4"))  # Python ints: no uint32 wrap
        if raw_size != n * dtype.itemsize:
            raise DataFormatError(path, f"uncompressed size {raw_size} != {n} points x {dtype.itemsize} bytes")
        if len(body) < 8 + comp_size:
            raise DataFormatError(path, f"binary_compressed PCD truncated: {len(body) - 8} of {comp_size} bytes")
        if n == 0:
            return np.zeros(0, dtype=dtype)
        try:
            data = lzf.decompress(body[8 : 8 + comp_size], raw_size)
        except (ValueError, OSError, SystemError):
            data = None
        if data is None or len(data) != raw_size:
            raise DataFormatError(path, "LZF data does not decompress to the declared size (corrupt)")
        # binary_compressed stores each field as a contiguous column
        out = np.empty(n, dtype=dtype)
        start = 0
        for name in dtype.names:
            field = dtype.fields[name][0]
            stop = start + n * field.itemsize
            out[name] = np.frombuffer(data[start:stop], dtype=field.base).reshape((n,) + field.shape)
            start = stop
        return out
    # ascii
    try:
        flat = np.fromstring(body.decode("ascii", errors="replace"), sep=" ")  # noqa: NPY201 (fast C parser)
    except ValueError as exc:
        raise DataFormatError(path, f"ascii PCD data is not numeric ({exc})") from None
    columns = sum(header.counts)
    if flat.size != n * columns:
        raise DataFormatError(path, f"ascii PCD has {flat.size} values, expected {n} x {columns} (truncated?)")
    table = flat.reshape(n, columns)
    out = np.empty(n, dtype=dtype)
    col = 0
    for name, count in zip(header.fields, header.counts):
        values = table[:, col : col + count]
        out[name] = values[:, 0] if count == 1 else values
        col += count
    return out


def _lzf_literal_stream(data: bytes) -> bytes:
    """A valid LZF stream of literal runs only: used when real compression would not shrink data."""
    buf = np.frombuffer(data, dtype=np.uint8)
    full = len(buf) // 32
    blocks = np.empty((full, 33), dtype=np.uint8)
    blocks[:, 0] = 31
    blocks[:, 1:] = buf[: full * 32].reshape(full, 32)
    tail = buf[full * 32 :]
    parts = [blocks.tobytes()]
    if len(tail):
        parts.append(bytes([len(tail) - 1]) + tail.tobytes())
    return b"".join(parts)


def write_pcd(path: str | Path, cloud: np.ndarray, data: str = "binary", ascii_formats: dict[str, str] | None = None) -> None:
    """Write a structured array as PCD v0.7 (atomically)."""
    dtype = cloud.dtype
    fields, sizes, types, counts = [], [], [], []
    for name in dtype.names:
        base = dtype.fields[name][0]
        kind = {"f": "F", "u": "U", "i": "I"}[base.base.kind]
        fields.append(name)
        sizes.append(base.base.itemsize)
        types.append(kind)
        counts.append(int(np.prod(base.shape)) if base.shape else 1)
    n = len(cloud)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\nTYPE {' '.join(types)}\n"
        f"COUNT {' '.join(map(str, counts))}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n}\nDATA {data}\n"
    ).encode("ascii")
    if data == "binary":
        body = np.ascontiguousarray(cloud).astype(dtype.newbyteorder("<")).tobytes()
    elif data == "binary_compressed":
        raw = b"".join(np.ascontiguousarray(cloud[name]).astype(dtype.fields[name][0].base.newbyteorder("<")).tobytes()
                       for name in dtype.names)
        packed = lzf.compress(raw) if raw else b""
        if raw and packed is None:
            packed = _lzf_literal_stream(raw)
        body = np.array([len(packed), len(raw)], dtype="<u4").tobytes() + packed
    elif data == "ascii":
        formats = ascii_formats or {}
        cols = [np.asarray(cloud[name], dtype=np.float64).reshape(n, -1) for name in dtype.names]
        fmt = " ".join(formats.get(name, "%.9g") for name, c in zip(dtype.names, cols) for _ in range(c.shape[1]))
        table = np.concatenate(cols, axis=1) if cols else np.zeros((n, 0))
        lines = [(fmt % tuple(row)) for row in table.tolist()] if n else []
        body = ("\n".join(lines) + ("\n" if lines else "")).encode("ascii")
    else:
        raise ValueError(f"unknown PCD DATA kind {data!r}")
    atomic_write_bytes(path, header + body)


def pack_opv2v_intensity(intensity: np.ndarray) -> np.ndarray:
    """Intensity in [0, 1] -> the float32 'rgb' of the OPV2V release (bits = r << 16)."""
    r = np.clip(np.round(np.asarray(intensity) * 255.0), 0, 255).astype(np.uint32)
    return (r << 16).view(np.float32)


def unpack_opv2v_intensity(rgb: np.ndarray) -> np.ndarray:
    """The float32 'rgb' field -> intensity r / 255 (reinterpret the bits, not the value)."""
    bits = np.asarray(rgb, dtype=np.float32).view(np.uint32)
    return ((bits >> 16) & 0xFF).astype(np.float32) / 255.0


def read_lidar_points(path: str | Path) -> np.ndarray:
    """Read a LiDAR PCD into (N, 4) float32 `x y z intensity` with intensity in [0, 1]."""
    cloud = read_pcd(path)
    names = cloud.dtype.names or ()
    for axis in ("x", "y", "z"):
        if axis not in names:
            raise DataFormatError(path, f"PCD has no '{axis}' field (fields: {' '.join(names)})")
    pts = np.empty((len(cloud), 4), dtype=np.float32)
    pts[:, 0], pts[:, 1], pts[:, 2] = cloud["x"], cloud["y"], cloud["z"]
    if "intensity" in names:
        raw = cloud["intensity"]
        if raw.dtype.kind in "ui":
            pts[:, 3] = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
        else:
            pts[:, 3] = raw
    elif "rgb" in names:
        pts[:, 3] = unpack_opv2v_intensity(cloud["rgb"])
    else:
        pts[:, 3] = 0.0
    finite = np.isfinite(pts[:, :3]).all(axis=1)
    return pts[finite]
