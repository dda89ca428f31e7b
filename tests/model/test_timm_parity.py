"""timm parity: Virchow 2's published layout (vit_huge_patch14_224, reg_tokens=4, SwiGLUPacked) both ways.

Width, heads, registers and MLP are ViT-H/14's; depth is 2 for CI speed (same key layout).
"""
import dataclasses

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

from virchow_fast.config import load_config  # noqa: E402
from virchow_fast.model.timm_compat import export_timm_state_dict, load_timm_state_dict, timm_kwargs  # noqa: E402
from virchow_fast.model.vit import VisionTransformer  # noqa: E402

CFG = dataclasses.replace(load_config("vit_h14_virchow2").model, depth=2, drop_path=0.0)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = TimmViT(**timm_kwargs(CFG)).eval()
    with torch.no_grad():  # timm inits LayerScale at 1e-5: make the blocks matter for the comparison
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    ours = VisionTransformer(CFG).eval()
    return ref, ours


def test_timm_kwargs_are_virchow2s():
    kw = timm_kwargs(load_config("vit_h14_virchow2").model)
    assert kw["mlp_ratio"] == pytest.approx(5.3375) and kw["reg_tokens"] == 4 and kw["init_values"] == 1e-5
    assert int(kw["embed_dim"] * kw["mlp_ratio"]) == 6832


@pytest.mark.parametrize("size", [224, 98])
def test_timm_weights_load_strict_and_give_same_tokens(pair, size):
    ref, ours = pair
    load_timm_state_dict(ours, ref.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = ours(x)
    assert got.shape == expected.shape
    assert _rel_err(got, expected) <= 1e-5


def test_export_back_to_timm(pair):
    ref, _ = pair
    torch.manual_seed(3)
    ours = VisionTransformer(CFG).eval()
    fresh = TimmViT(**timm_kwargs(CFG)).eval()
    fresh.load_state_dict(export_timm_state_dict(ours), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel_err(ours(x), fresh.forward_features(x)) <= 1e-5


def test_mismatched_keys_are_named(pair):
    ref, ours = pair
    state = dict(ref.state_dict())
    state.pop("blocks.1.ls2.gamma")
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="blocks.1.ls2.gamma.*head.weight"):
        load_timm_state_dict(ours, state)
