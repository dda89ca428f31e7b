"""Schedules as arrays indexed by step; AdamW groups: decay, layer-wise lr, patch embed, prototypes."""
import math

import numpy as np
import pytest
import torch

from virchow_fast.config import load_config
from virchow_fast.model.ssl import SSLNetwork, ema_update, make_teacher
from virchow_fast.train.optim import apply_schedules, build_optimizer, param_groups
from virchow_fast.train.schedules import build_schedules, cosine


def test_cosine_with_warmup_endpoints_and_shape():
    s = cosine(1.0, 0.1, 20, warmup_steps=5)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert s[5] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[5:]) <= 1e-12)
    mid = 5 + 7
    assert s[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 14)))


def test_schedules_follow_recipe():
    cfg = load_config("configs/debug.yaml", ["train.epochs=4", "train.steps_per_epoch=5", "optim.warmup_epochs=1",
                                             "loss.warmup_teacher_temp_epochs=2", "optim.freeze_last_layer_epochs=1"])
    s = build_schedules(cfg, peak_lr=0.5, total_steps=20)
    assert s.lr[0] == 0.0 and s.lr[5] == pytest.approx(0.5) and s.lr[-1] == pytest.approx(cfg.optim.min_lr)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.2)
    assert s.momentum[0] == pytest.approx(0.994) and s.momentum[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(s.teacher_temp[:10], np.linspace(0.04, 0.07, 10))
    assert np.all(s.teacher_temp[10:] == 0.07)
    assert np.all(s.last_layer_lr[:5] == 0) and np.array_equal(s.last_layer_lr[5:], s.lr[5:])
    assert s.at(7)["lr"] == pytest.approx(float(s.lr[7]))


@pytest.fixture(scope="module")
def net():
    cfg = load_config("configs/debug.yaml")
    return cfg, SSLNetwork(cfg.model, cfg.heads)


def test_param_groups_decay_layerwise_lr_and_prototypes(net):
    cfg, model = net
    depth = cfg.model.depth
    groups = param_groups(model, depth, cfg.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)
    for name in ("backbone.cls_token", "backbone.reg_token", "backbone.pos_embed", "backbone.mask_token",
                 "backbone.blocks.0.ls1.gamma", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias",
                 "dino_head.mlp.0.bias"):
        assert by_name[name]["wd_mult"] == 0.0, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "dino_head.prototypes"):
        assert by_name[name]["wd_mult"] == 1.0, name
    d = cfg.optim.layer_decay
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_mult"] == pytest.approx(d ** depth)
    assert by_name[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_mult"] == pytest.approx(d)
    assert by_name["backbone.norm.weight"]["lr_mult"] == pytest.approx(1.0)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(
        d ** (depth + 1) * cfg.optim.patch_embed_lr_mult)
    assert by_name["dino_head.prototypes"]["is_last_layer"] and by_name["ibot_head.prototypes"]["is_last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]


def test_apply_schedules_sets_each_group(net):
    cfg, model = net
    opt = build_optimizer(model, cfg.model.depth, cfg.optim, "cpu")
    apply_schedules(opt, lr=1.0, weight_decay=0.5, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.0 if g["is_last_layer"] else g["lr_mult"])
        assert g["weight_decay"] == pytest.approx(0.5 * g["wd_mult"])


def test_teacher_is_ema_without_gradients(net):
    cfg, model = net
    teacher = make_teacher(model)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema_update(teacher, model, momentum=0.9)
    for (n, t), s in zip(teacher.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before[n] + 0.1 * s)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)
