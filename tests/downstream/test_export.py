"""export: timm loads the pair strictly and gives our tokens (fp32, 1e-5); files are never overwritten unasked."""
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from virchow_fast.downstream.export import export, timm_model  # noqa: E402
from virchow_fast.downstream.weights import WeightsError, load_model, read_weights  # noqa: E402


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_timm_create_model_loads_export_strictly_same_tokens(tiny_run, tmp_path):
    out, cfg_path = export(tiny_run, tmp_path / "exp" / "model.safetensors")
    meta = json.loads(cfg_path.read_text())
    ref = timm.create_model("vit_huge_patch14_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                            mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, **meta["model_args"]).eval()
    ours, _ = load_model(tiny_run)  # the newest teacher, straight from the checkpoint
    x = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.forward_features(x)
        assert _rel_err(ours(x), want) <= 1e-5
        assert _rel_err(timm_model(out).eval().forward_features(x), want) == 0.0
    assert meta["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and meta["virchow_fast"]["step"] == 2
    # the export itself reads back into our ViT with the same weights
    again, w = load_model(out)
    with torch.no_grad():
        assert _rel_err(again(x), want) <= 1e-5
    assert w.model.embed_dim == 48 and w.model.num_registers == 2


def test_step_and_which_pick_the_network(tiny_run, tmp_path):
    a, _ = export(tiny_run, tmp_path / "a" / "model.safetensors", step=1, which="student")
    b, _ = export(tiny_run, tmp_path / "b" / "model.safetensors", step=2, which="teacher")
    sa, sb = read_weights(a).state, read_weights(b).state
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sb["blocks.0.attn.qkv.weight"])
    with pytest.raises(WeightsError, match="no complete checkpoint of step 7 \\(have: 1, 2\\)"):
        export(tiny_run, tmp_path / "c" / "model.safetensors", step=7)


def test_refuses_to_overwrite_without_being_told(tiny_run, tmp_path):
    out = tmp_path / "model.safetensors"
    export(tiny_run, out, step=1)
    before = out.read_bytes()
    with pytest.raises(WeightsError, match="model.safetensors exists; pass --overwrite"):
        export(tiny_run, out, step=2)
    assert out.read_bytes() == before
    export(tiny_run, out, step=2, overwrite=True)
    assert out.read_bytes() != before


def test_damaged_checkpoint_is_passed_over_or_named(tiny_run, tmp_path, capsys):
    """A checkpoint whose file no longer matches its manifest (one flipped byte, same size) is never
    read: the newest-checkpoint choice falls back to the one before it and says so; asking for that
    step is one line naming the file; the run directory is left as it was."""
    import shutil

    from virchow_fast.logs import ensure_logging

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    newest = run / "checkpoints" / "step_00000002"
    data = sorted(newest.glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    ensure_logging()
    capsys.readouterr()
    w = read_weights(run)
    said = capsys.readouterr().err
    assert w.step == 1 and "step_00000002" in said and "checksum" in said and "reading step_00000001" in said
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(w.state[key], read_weights(tiny_run, step=1).state[key])
    with pytest.raises(WeightsError, match=r"step_00000002: damaged \(.*checksum.*\); choose another --step"):
        export(run, tmp_path / "x" / "model.safetensors", step=2)
    assert not (tmp_path / "x" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing renamed or removed
