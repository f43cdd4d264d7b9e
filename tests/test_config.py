import pytest

from coperception.config import load_config
from coperception.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\nsimulator:\n  lidar:\n    beams: 16\n")
    cfg = load_config(path, ["train.epochs=3", "simulator.lidar.vertical_fov=[-20, 2]", "dataset.format=dair-v2x"])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3
    assert cfg.simulator.lidar.beams == 16 and cfg.simulator.lidar.vertical_fov == (-20, 2)
    assert cfg.dataset.format == "dair-v2x"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.learning_rate.*Extra inputs"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("simulator:\n  lidar:\n    beams: many\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*simulator\.lidar\.beams"):
        load_config(path)


def test_bad_override_and_bad_range(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"dataset\.point_cloud_range"):
        load_config(None, ["dataset.point_cloud_range=[1, 0, 0, 0, 1, 1]"])
    with pytest.raises(ConfigError, match="missing.yaml.*does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "coperception" / "configs").rglob("*.yaml"))
    assert files, "configs/ holds the shipped presets"
    for path in files:
        load_config(path)


def test_base_include_merges_and_rejects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.01\n  epochs: 4\ndataset:\n  max_agents: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.lr, cfg.train.epochs, cfg.dataset.max_agents) == (0.01, 7, 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "lost.yaml")


def test_comm_and_demo_sections_are_validated():
    with pytest.raises(ConfigError, match=r"comm\.codebook\.codes"):
        load_config(None, ["comm.codebook.codes=100"])
    with pytest.raises(ConfigError, match="not trained"):
        load_config(None, ["demo.fusion_methods=[early]", "demo.eval_methods=[none, max]"])
    with pytest.raises(ConfigError, match=r"comm\.channel\.loss_rate"):
        load_config(None, ["comm.channel.loss_rate=1.5"])


@pytest.mark.parametrize("old, advice", [("where2comm", "comm.codec: sparse"), ("codebook", "comm.codec: codebook"),
                                         ("late", "cooperation.strategy: late"), ("none", "cooperation.strategy: none")])
def test_old_method_names_say_what_to_write_instead(old, advice):
    with pytest.raises(ConfigError, match=advice):
        load_config(None, [f"fusion.method={old}"])
    with pytest.raises(ConfigError, match="cooperation.project_first"):
        load_config(None, ["fusion.project_first=false"])


@pytest.mark.parametrize("override, message", [
    ("cooperation.strategy=mid", r"cooperation.strategy 'mid' is unknown; known: anchor, early, intermediate, late, none"),
    ("comm.codec=zip", r"comm.codec 'zip' is unknown; known: codebook, dense, sparse"),
    ("fusion.method=sum", r"fusion.method 'sum' is unknown; known: attention, max, mean"),
    ("model.encoders={default: voxelnet}", r"model.encoders 'voxelnet' is unknown; known: .*pointpillars"),
    ("demo.fusion_methods=[early, max, sum]", r"demo.fusion_methods: .sum. is neither"),
])
def test_names_are_checked_against_the_registries(override, message):
    from coperception.pipeline.model import validate_config

    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_a_fusions_name_is_not_checked_when_no_features_are_sent():
    from coperception.pipeline.model import validate_config

    validate_config(load_config(None, ["cooperation.strategy=late", "comm.codec=anything"]))
    with pytest.raises(ConfigError, match="encoders: keys are agent kinds"):
        load_config(None, ["model.encoders={car: pointpillars}"])
