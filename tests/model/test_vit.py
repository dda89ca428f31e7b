"""ViT: token layout, parameter counts, packed crops equal separate forwards, tile embedding."""
import pytest
import torch

from virchow_fast.config import ModelConfig, load_config
from virchow_fast.model.info import model_info
from virchow_fast.model.vit import VisionTransformer, tile_embedding

TINY = ModelConfig(embed_dim=48, depth=2, num_heads=3, mlp_hidden=64, num_registers=4, layerscale_init=0.1)


def _vit(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(cfg).eval()


def test_token_layout_and_shapes():
    vit = _vit()
    assert vit.pos_embed.shape == (1, 1 + 4 + 16 * 16, 48)  # timm layout: cls + registers + 16x16 grid
    g = vit(torch.randn(2, 3, 224, 224))
    loc = vit(torch.randn(3, 3, 98, 98))
    assert g.shape == (2, 261, 48) and loc.shape == (3, 54, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, 100, 100))


def test_pos_embed_resample_matches_timm():
    timm_pos = pytest.importorskip("timm.layers").resample_abs_pos_embed
    vit = _vit()
    ours = vit.pos_embed_for(7)
    ref = timm_pos(vit.pos_embed, new_size=(7, 7), old_size=(16, 16), num_prefix_tokens=5)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("path, expected, tol", [
    ("configs/vit_h14_virchow2.yaml", 632e6, 0.01),
    ("configs/vit_g14_virchow2g.yaml", 1.85e9, 0.03),
])
def test_parameter_counts_on_meta(path, expected, tol):
    info = model_info(load_config(path))
    assert abs(info["backbone_params"] - expected) / expected <= tol
    assert info["dino_head_params"] > 0 and info["ibot_head_params"] > 0


def test_flops_per_tile_matches_recipe_arithmetic():
    info = model_info(load_config("configs/vit_h14_virchow2.yaml"))
    # RECIPE: 6 N T (student) + 2 N T (teacher) plus 2-3 % attention, about 4.4 TFLOP for ViT-H/14
    n, t_s, t_t = info["backbone_params"], info["student_tokens_per_tile"], info["teacher_tokens_per_tile"]
    dense = (6 * n * t_s + 2 * n * t_t) / 1e12
    assert info["student_tokens_per_tile"] == 2 * 261 + 8 * 54
    assert dense < info["tflops_per_tile_step"] < dense * 1.08
    assert 4.2 < info["tflops_per_tile_step"] < 4.6


def test_packed_forward_equals_separate_forwards():
    vit = _vit()
    g, loc = torch.randn(4, 3, 224, 224), torch.randn(6, 3, 98, 98)
    masks = torch.rand(4, 256) < 0.3
    packed_g, packed_l = vit.forward_packed([g, loc], [masks, None])
    torch.testing.assert_close(packed_g, vit(g, masks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_l, vit(loc), rtol=1e-5, atol=1e-5)
    # and each crop alone: attention never crosses crops
    torch.testing.assert_close(packed_l[2:3], vit(loc[2:3]), rtol=1e-5, atol=1e-5)


def test_masks_replace_patches_with_mask_token():
    vit = _vit()
    with torch.no_grad():
        vit.mask_token.normal_()
    x = torch.randn(1, 3, 224, 224)
    all_masked = torch.ones(1, 256, dtype=torch.bool)
    a = vit.prepare_tokens(x, all_masked)
    b = vit.prepare_tokens(torch.randn(1, 3, 224, 224), all_masked)
    torch.testing.assert_close(a, b)  # nothing of the image survives a full mask
    assert not torch.allclose(a, vit.prepare_tokens(x))


def test_drop_path_is_per_crop_and_off_in_eval():
    cfg = ModelConfig(embed_dim=48, depth=2, num_heads=3, mlp_hidden=64, drop_path=0.5)
    vit = _vit(cfg)
    x = torch.randn(4, 3, 98, 98)
    ref = vit(x)
    vit.train()
    torch.manual_seed(1)
    outs = [vit(x) for _ in range(6)]
    assert any(not torch.allclose(o, ref) for o in outs)
    vit.eval()
    torch.testing.assert_close(vit(x), ref)


def test_tile_embedding_concat_cls_and_patch_mean():
    tokens = torch.randn(2, 261, 48)
    emb = tile_embedding(tokens, num_prefix=5)
    assert emb.shape == (2, 96)
    torch.testing.assert_close(emb[:, :48], tokens[:, 0])
    torch.testing.assert_close(emb[:, 48:], tokens[:, 5:].mean(1))


def test_block_updates_the_stream_in_place_only_when_allowed():
    """Without autograd a block adds its residual GEMMs into the stream's buffer only with inplace
    (VisionTransformer passes its own stream); a caller's x is never changed otherwise, and the
    values are the same either way (and as with autograd on)."""
    from virchow_fast.config import ModelConfig
    from virchow_fast.model.vit import Block

    torch.manual_seed(0)
    block = Block(ModelConfig(embed_dim=32, num_heads=2, mlp_hidden=24, layerscale_init=0.5), drop_path=0.0).eval()
    cu, seg = torch.tensor([0, 9, 13], dtype=torch.int32), torch.tensor([0] * 9 + [1] * 4)
    x = torch.randn(13, 32)
    with torch.no_grad():
        kept = x.clone()
        out = block(x, cu, 9, seg)
        assert torch.equal(x, kept)  # not allowed: x untouched
        own = x.clone()
        out_inplace = block(own, cu, 9, seg, inplace=True)
        assert out_inplace.data_ptr() == own.data_ptr()  # the stream's own buffer, updated
    torch.testing.assert_close(out_inplace, out, rtol=0, atol=0)
    with_grad = block(x.clone().requires_grad_(), cu, 9, seg)
    torch.testing.assert_close(with_grad.detach(), out, rtol=1e-6, atol=1e-6)
