import numpy as np
import pytest

from coperception.datasets.pcd import pack_opv2v_intensity, read_lidar_points, read_pcd, unpack_opv2v_intensity, write_pcd
from coperception.errors import DataFormatError
from tests.conftest import REALDATA


def opv2v_cloud(n=500, seed=0):
    rng = np.random.default_rng(seed)
    cloud = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
    cloud["x"], cloud["y"], cloud["z"] = rng.uniform(-50, 50, (3, n)).astype(np.float32)
    cloud["rgb"] = pack_opv2v_intensity(rng.random(n))
    return cloud


@pytest.mark.parametrize("kind", ["ascii", "binary", "binary_compressed"])
def test_round_trip_each_encoding(tmp_path, kind):
    cloud = opv2v_cloud()
    path = tmp_path / f"c_{kind}.pcd"
    write_pcd(path, cloud, data=kind)
    back = read_pcd(path)
    assert back.dtype.names == cloud.dtype.names
    for name in cloud.dtype.names:
        np.testing.assert_array_equal(back[name].view(np.uint32), cloud[name].view(np.uint32))


def test_opv2v_intensity_is_packed_in_rgb_bits(tmp_path):
    cloud = opv2v_cloud()
    # the value is a denormal float, never the intensity itself
    assert np.abs(cloud["rgb"]).max() < 1e-30
    path = tmp_path / "o.pcd"
    write_pcd(path, cloud, data="ascii")
    pts = read_lidar_points(path)
    np.testing.assert_allclose(pts[:, 3], unpack_opv2v_intensity(cloud["rgb"]))
    assert 0 <= pts[:, 3].min() and pts[:, 3].max() <= 1


def test_incompressible_data_still_writes_valid_lzf(tmp_path):
    rng = np.random.default_rng(3)
    cloud = np.zeros(40, dtype=[("x", "<f4"), ("intensity", "u1")])
    cloud["x"] = rng.random(40).astype(np.float32)
    cloud["intensity"] = rng.integers(0, 255, 40)
    write_pcd(tmp_path / "r.pcd", cloud, data="binary_compressed")
    np.testing.assert_array_equal(read_pcd(tmp_path / "r.pcd"), cloud)


@pytest.mark.parametrize("kind", ["ascii", "binary", "binary_compressed"])
def test_truncated_pcd_names_file_and_problem(tmp_path, kind):
    path = tmp_path / f"t_{kind}.pcd"
    write_pcd(path, opv2v_cloud(2000), data=kind)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    with pytest.raises(DataFormatError, match=r"t_.*\.pcd.*truncated"):
        read_pcd(path)


def test_header_only_and_missing_file(tmp_path):
    path = tmp_path / "h.pcd"
    path.write_bytes(b"VERSION 0.7\nFIELDS x y z\n")
    with pytest.raises(DataFormatError, match="h.pcd.*DATA"):
        read_pcd(path)
    with pytest.raises(DataFormatError, match="nope.pcd.*does not exist"):
        read_pcd(tmp_path / "nope.pcd")


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
def test_real_dair_vehicle_pcd_uint8_intensity():
    path = REALDATA / "vehicle-side/velodyne/017314.pcd"
    cloud = read_pcd(path)
    assert cloud.dtype.names == ("x", "y", "z", "intensity", "timestamp")
    assert cloud["intensity"].dtype == np.uint8 and cloud["timestamp"].dtype == np.float64
    assert len(cloud) == 62199
    pts = read_lidar_points(path)
    np.testing.assert_allclose(pts[:, 3], cloud["intensity"] / 255.0, rtol=1e-6)
    assert 0 < pts[:, 3].min() and pts[:, 3].max() < 1  # 1..254 / 255
    assert 1.6e9 < cloud["timestamp"].min() < 1.7e9
    # an independent decoding of the LZF body: x, y, z are its first three float32 columns
    raw = path.read_bytes()
    body = raw[raw.index(b"DATA binary_compressed\n") + len(b"DATA binary_compressed\n"):]
    compressed, size = np.frombuffer(body[:8], dtype="<u4")
    columns = _reference_lzf_decompress(body[8 : 8 + int(compressed)])
    assert len(columns) == size
    n = len(cloud)
    xyz = np.frombuffer(columns[: 12 * n], dtype="<f4").reshape(3, n).T
    np.testing.assert_array_equal(xyz, pts[:, :3])


def _reference_lzf_decompress(data: bytes) -> bytes:
    """LZF as its format defines it: a control byte below 32 starts a literal run of ctrl + 1 bytes;
    otherwise it is a back reference of (ctrl >> 5) + 2 bytes (7 means: add the next byte) at distance
    ((ctrl & 31) << 8) + next byte + 1."""
    out = bytearray()
    i = 0
    while i < len(data):
        ctrl = data[i]
        i += 1
        if ctrl < 32:
            out += data[i : i + ctrl + 1]
            i += ctrl + 1
            continue
        length = ctrl >> 5
        if length == 7:
            length += data[i]
            i += 1
        start = len(out) - ((ctrl & 31) << 8) - data[i] - 1
        i += 1
        for k in range(length + 2):  # may overlap what it writes: copy byte by byte
            out.append(out[start + k])
    return bytes(out)


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
def test_real_dair_infrastructure_pcd_float_intensity():
    path = REALDATA / "infrastructure-side/velodyne/001366.pcd"
    pts = read_lidar_points(path)
    raw = read_pcd(path)
    assert raw["intensity"].dtype == np.float32 and len(pts) == 53653
    np.testing.assert_array_equal(pts[:, 3], raw["intensity"])  # already in [0, 1]: not rescaled
    assert pts[:, 3].max() <= 1.0 and pts[:, 3].mean() < 0.5
