"""model.init_from: strict loads from every kind of source; the run starts from exactly those weights."""
import dataclasses

import pytest
import torch
from conftest import random_backbone, tiny_config

from virchow_fast.config import ConfigError
from virchow_fast.model.timm_compat import StateDictMismatch, export_timm_state_dict, load_timm_state_dict
from virchow_fast.train.distributed import DistInfo


def _save(state: dict, path, kind: str) -> str:
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "pth-wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save(state, path)
    return str(path)


def _build(cfg):
    from virchow_fast.train.loop import build

    return build(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.mark.parametrize("kind,suffix", [("safetensors", ".safetensors"), ("pth-wrapped", ".pth"), ("bin", ".bin")])
def test_build_starts_student_and_teacher_from_the_file(tmp_path, kind, suffix):
    src = export_timm_state_dict(random_backbone(7))
    path = _save(src, tmp_path / f"model{suffix}", kind)
    student, teacher, _, _ = _build(tiny_config(f"model.init_from={path}"))
    for net in (student, teacher):
        got = net.backbone.state_dict()
        for key, value in src.items():
            assert torch.equal(got[key], value), key
    # the heads are the seed's random init, equal in both
    for a, b in zip(student.dino_head.parameters(), teacher.dino_head.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pos_embed_of_another_grid_is_resampled_like_timm(tmp_path):
    timm = pytest.importorskip("timm")
    small = random_backbone(8, "model.img_size=28", "data.crops.global_size=28")  # a 2 x 2 grid
    path = _save(export_timm_state_dict(small), tmp_path / "small.safetensors", "safetensors")
    student, teacher, _, _ = _build(tiny_config(f"model.init_from={path}"))  # a 3 x 3 grid
    want = timm.layers.resample_abs_pos_embed(small.pos_embed.detach(), (3, 3), (2, 2), num_prefix_tokens=3,
                                              interpolation="bicubic", antialias=True)
    assert torch.allclose(student.backbone.pos_embed, want, atol=1e-6)
    assert torch.equal(teacher.backbone.pos_embed, student.backbone.pos_embed)


def test_mismatch_is_one_line_naming_missing_unexpected_and_misshaped(tmp_path):
    state = export_timm_state_dict(random_backbone(9))
    state.pop("blocks.1.ls2.gamma")
    state["head.weight"] = torch.zeros(3, 48)
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(48, 32)
    path = _save(state, tmp_path / "bad.safetensors", "safetensors")
    with pytest.raises(ConfigError) as err:
        _build(tiny_config(f"model.init_from={path}"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.init_from: ") and "bad.safetensors" in msg
    assert "missing ['blocks.1.ls2.gamma']" in msg and "unexpected ['head.weight']" in msg
    assert "mis-shaped ['blocks.0.mlp.fc2.weight (48, 32) (model: (48, 64))']" in msg


def test_a_registerless_file_is_refused_not_resampled(tmp_path):
    other = random_backbone(10, "model.num_registers=0")
    model = random_backbone(11)
    with pytest.raises(StateDictMismatch, match="missing \\['reg_token'\\].*mis-shaped \\['pos_embed"):
        load_timm_state_dict(model, export_timm_state_dict(other))


def test_init_from_a_run_directory_takes_its_newest_teacher(tiny_run):
    from virchow_fast.downstream.weights import read_checkpoint_backbone

    student, teacher, _, _ = _build(tiny_config(f"model.init_from={tiny_run}"))
    newest = read_checkpoint_backbone(tiny_run / "checkpoints" / "step_00000002", "teacher")
    for key, value in newest.items():
        assert torch.equal(student.backbone.state_dict()[key], value), key
        assert torch.equal(teacher.backbone.state_dict()[key], value), key


def test_freeze_backbone_steps_zero_backbone_lr_only():
    from virchow_fast.config import derive
    from virchow_fast.train.schedules import build_schedules

    cfg = tiny_config("train.freeze_backbone_steps=1", "train.steps_per_epoch=3")
    sched = build_schedules(cfg, derive(cfg).peak_lr, 3)
    assert sched.backbone_lr[0] == 0.0 and sched.backbone_lr[1] == sched.lr[1] > 0
    assert sched.lr[0] > 0
    cfg0 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze_backbone_steps=0))
    assert (build_schedules(cfg0, 1e-3, 3).backbone_lr == build_schedules(cfg0, 1e-3, 3).lr).all()
