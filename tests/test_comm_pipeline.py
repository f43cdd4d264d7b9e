"""Sparse messages end to end: training with selection + codebook, evaluation through wire and channel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from coperception.comm.kinds import MessageKind
from coperception.comm.wire import Message, encode_message
from coperception.config import load_config
from coperception.evaluate import evaluate_method
from coperception.pipeline.model import build_model, load_model
from coperception.train import train

from test_train import TINY


def comm_config(opv2v_set, out_dir, *extra):
    return load_config(None, [f"dataset.root={opv2v_set.root}", "dataset.train_split=test", "dataset.val_split=test",
                              "dataset.eval_split=test", f"train.out_dir={out_dir}", *TINY, "comm.codebook.codes=16",
                              "comm.codebook.segments=4", "comm.codebook.stages=2", "comm.selection.threshold=0.0",
                              "comm.selection.top_k=40", *extra])


@pytest.fixture(scope="module")
def codebook_run(opv2v_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("codebook")
    cfg = comm_config(opv2v_set, out, "comm.codec=codebook", "train.max_steps=4")
    summary = train(cfg, progress=False)
    return cfg, out, summary


def test_codebook_model_trains_and_sends_measured_codes(codebook_run):
    cfg, out, summary = codebook_run
    assert summary["steps"] == 4 and np.isfinite(summary["history"][-1]["loss"])
    model = load_model(out / "last.pt", cfg)
    assert model.agent is not None and bool(model.agent.codec.quantizer.initialised)
    entry = evaluate_method(model, cfg, "test", progress=False)
    # 40 cells x 4 segments x 2 stages x 4 bits = 160 bytes of codes per sender, plus indices and headers
    assert 160 < entry["bytes_per_agent_frame"] < 160 + 40 * 3 + 200
    assert entry["bytes_per_frame"] > entry["bytes_per_agent_frame"]
    assert entry["mean_fused_age_s"] == pytest.approx(0.0)
    sparse_cfg = cfg.variant(codec="sparse")
    fp32 = evaluate_method(load_model_as(out / "last.pt", cfg, sparse_cfg), sparse_cfg, "test", progress=False)
    assert fp32["bytes_per_agent_frame"] > 40 * model.encoders.out_channels * 4  # fp32 values of the same cells


def load_model_as(checkpoint, trained_cfg, cfg):
    """The trained weights in a model built for `cfg` (the codebook itself is not needed for fp32 messages)."""
    from coperception.checkpoint import load_checkpoint

    model = build_model(cfg)
    state = {k: v for k, v in load_checkpoint(checkpoint)["model"].items() if not k.startswith("agent.codec.")}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def test_total_loss_falls_back_to_ego_only_and_delay_fuses_older_frames(codebook_run, opv2v_set):
    cfg, out, _ = codebook_run
    lost = cfg.model_copy(deep=True)
    lost.comm.channel.loss_rate = 1.0
    model = load_model(out / "last.pt", lost)
    at_full_loss = evaluate_method(model, lost, "test", progress=False)
    assert at_full_loss["bytes_per_agent_frame"] == 0.0 and at_full_loss["mean_fused_age_s"] is None
    ego_only = lost.variant(strategy="none")
    alone = evaluate_method(load_model_as(out / "last.pt", cfg, ego_only), ego_only, "test", progress=False)
    for iou, ap in alone["ap"].items():  # the same weights on the ego's own view only
        assert at_full_loss["ap"][iou] == pytest.approx(ap, abs=0.01)

    delayed = cfg.model_copy(deep=True)
    delayed.comm.channel.latency_ms = 150.0
    entry = evaluate_method(load_model(out / "last.pt", delayed), delayed, "test", progress=False)
    # each test scenario has 3 frames at 10 Hz: only the last frame can use the first frame's messages
    assert entry["mean_fused_age_s"] == pytest.approx(0.2)
    for max_age, fused in ((250.0, True), (150.0, False)):  # a 200 ms old message is fused only under 250 ms
        capped = delayed.model_copy(deep=True)
        capped.comm.channel.max_message_age_ms = max_age
        result = evaluate_method(load_model(out / "last.pt", capped), capped, "test", progress=False)
        assert result["bytes_per_agent_frame"] == entry["bytes_per_agent_frame"]  # sent and received all the same
        if fused:
            assert result["mean_fused_age_s"] == pytest.approx(0.2) and result["ap"] == entry["ap"]
        else:
            assert result["mean_fused_age_s"] is None
            for iou, ap in alone["ap"].items():  # nothing fused: the ego alone
                assert result["ap"][iou] == pytest.approx(ap, abs=0.01)


def agent_key_file(opv2v_set, path):
    """Fresh keys for every CAV folder of the test world."""
    from coperception.comm.keys import write_keys

    write_keys(path, {int(cav.name) for cav in opv2v_set.root.glob("*/*/*") if cav.is_dir()})
    return str(path)


def test_signed_messages_verify_with_the_agents_keys(codebook_run, opv2v_set, tmp_path):
    cfg, out, _ = codebook_run
    signed = cfg.model_copy(deep=True)
    signed.comm.key_file = agent_key_file(opv2v_set, tmp_path / "keys.json")
    a = evaluate_method(load_model(out / "last.pt", signed), signed, "test", progress=False)
    b = evaluate_method(load_model(out / "last.pt", cfg), cfg, "test", progress=False)
    assert a["ap"] == b["ap"] and a["rejected_messages"] == {}
    assert a["bytes_per_agent_frame"] > b["bytes_per_agent_frame"]  # + a 32-byte HMAC per packet


def test_freeze_detector_fits_only_the_codebook_and_the_fusions_own_weights(codebook_run, opv2v_set, tmp_path):
    cfg, out, _ = codebook_run
    frozen = comm_config(opv2v_set, tmp_path / "frozen", "comm.codec=codebook", "train.max_steps=3",
                         f"train.init_from={out / 'last.pt'}", "train.freeze_detector=true")
    train(frozen, progress=False)
    from coperception.checkpoint import load_checkpoint

    before = load_checkpoint(out / "last.pt")["model"]
    after = load_checkpoint(tmp_path / "frozen" / "last.pt")["model"]

    def untouched_but_the_codec(tuned: dict) -> None:
        for key, value in before.items():
            if not key.startswith("agent.codec."):
                assert torch.equal(value, tuned[key]), key  # weights and BatchNorm statistics untouched

    untouched_but_the_codec(after)
    assert not torch.equal(before["agent.codec.quantizer.codebook"], after["agent.codec.quantizer.codebook"])
    # a fusion with weights trains them too (from the max model: attention starts fresh), the senders' side stays
    attention = comm_config(opv2v_set, tmp_path / "attention", "comm.codec=codebook", "train.max_steps=3",
                            f"train.init_from={out / 'last.pt'}", "train.freeze_detector=true",
                            "fusion.method=attention", "train.lr=0.01")
    train(attention, progress=False)
    tuned = load_checkpoint(tmp_path / "attention" / "last.pt")["model"]
    untouched_but_the_codec(tuned)
    fusion = {k: v for k, v in tuned.items() if k.startswith("ego.fusion.")}
    assert fusion and fusion["ego.fusion.out.weight"].abs().sum() > 0  # zero-initialised: it trained
    with pytest.raises(Exception, match="freeze_detector"):
        train(comm_config(opv2v_set, tmp_path / "bad", "comm.codec=dense", "train.freeze_detector=true"), progress=False)


def test_message_dropout_trains_and_never_drops_the_ego(opv2v_set, tmp_path):
    cfg = comm_config(opv2v_set, tmp_path / "drop", "comm.codec=dense", "train.max_steps=2",
                      "train.message_dropout=0.9")
    assert train(cfg, progress=False)["steps"] == 2
    model = build_model(cfg)
    from coperception.datasets.collate import collate, prepare_sample
    from coperception.pipeline.agent import drop_messages
    from coperception.datasets.readers import build_dataset

    sample = build_dataset(cfg.dataset, "test")[0]
    batch, _, _ = collate([prepare_sample(sample, "projected", cfg.dataset, cfg.model)])
    feats = torch.zeros(batch.n_agents, 4, 5, 6)
    torch.manual_seed(0)
    kept = torch.stack([drop_messages(batch, 0.9, feats)[:, 0, 0] for _ in range(200)])
    assert kept[:, 0].all()  # the ego always keeps its own view
    assert 0.0 < kept[:, 1:].float().mean() < 0.1  # 0.9 alone, else half of the senders dropped


def test_ego_supervision_is_the_head_on_the_ego_view_alone(opv2v_set, tmp_path):
    cfg = comm_config(opv2v_set, tmp_path / "ego", "comm.codec=codebook", "train.max_steps=2",
                      "train.ego_loss_weight=1.0")
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["history"][-1]["loss"])
    without = train(comm_config(opv2v_set, tmp_path / "fused", "comm.codec=codebook", "train.max_steps=2"),
                    progress=False)
    # the same seeded run plus a second detection loss of similar size
    assert summary["history"][-1]["loss"] > 1.3 * without["history"][-1]["loss"]
    from coperception.datasets.collate import collate, prepare_sample
    from coperception.datasets.readers import build_dataset

    samples = [prepare_sample(build_dataset(cfg.dataset, "test")[i], "projected", cfg.dataset, cfg.model)
               for i in (0, 1)]
    full, _, _ = collate(samples)
    ego_only, _, _ = collate([dataclasses.replace(s, agents=s.agents[:1]) for s in samples])
    model = load_model(tmp_path / "ego" / "last.pt", cfg)
    model.ego_loss = True
    model.train()
    for module in model.modules():  # keep BatchNorm statistics fixed so both passes see the same network
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.eval()
    with torch.no_grad():
        trained = model(full).ego_alone
        model.eval()
        assert model(full).ego_alone is None  # inference never pays for it
        alone = model(ego_only).head
    assert torch.allclose(trained.cls, alone.cls, atol=1e-5) and not torch.allclose(trained.cls, model(full).head.cls)


def test_filling_request_travels_in_the_egos_measured_broadcast(codebook_run):
    cfg, out, _ = codebook_run
    entries = {}
    for request_threshold in (0.0, 1.0):  # every cell requested / none (sigmoid scores stay below 1)
        run = cfg.model_copy(deep=True)
        run.comm.selection.filling = True
        run.comm.selection.request_threshold = request_threshold
        entries[request_threshold] = evaluate_method(load_model(out / "last.pt", run), run, "test",
                                                     progress=False)
    everything, nothing = entries[0.0], entries[1.0]
    grid = build_model(cfg).feature_grid
    pose_only = encode_message(Message(MessageKind.REQUEST, 0, 1, 0.0, np.eye(4), grid, np.zeros(0, np.int64)))
    assert nothing["broadcast_bytes_per_frame"] == sum(len(p) for p in pose_only)  # the pose, no cell
    assert everything["broadcast_bytes_per_frame"] > nothing["broadcast_bytes_per_frame"]
    assert everything["bytes_per_agent_frame"] < nothing["bytes_per_agent_frame"]  # the ego covers it all
