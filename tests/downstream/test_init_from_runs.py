"""A run initialised from a file starts from exactly its weights: 1 process and 2-process FSDP (gloo).

With train.freeze_backbone_steps=2 the backbone may not move for 2 steps (lr 0, teacher EMA paused),
so the step-2 checkpoint's student and teacher backbones must equal the file bit for bit (the
step-0 teacher as well, which is the student copied), while the heads have trained; after the
freeze (steps 2-3) the backbone trains.
"""
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from distrun import TINY, launch  # noqa: E402

from virchow_fast.config import load_config  # noqa: E402
from virchow_fast.downstream.weights import read_checkpoint_backbone  # noqa: E402
from virchow_fast.model.timm_compat import export_timm_state_dict  # noqa: E402
from virchow_fast.model.vit import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.slow


def _heads(ckpt: Path, which: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith(f"{which}.dino_head.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


@pytest.mark.parametrize("nproc", [1, 2])
def test_run_from_file_keeps_exact_weights_while_frozen(tmp_path, nproc):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    src = VisionTransformer(load_config("configs/debug.yaml", TINY).model)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = export_timm_state_dict(src)
    path = tmp_path / "pretrained.safetensors"
    save_file(weights, str(path))
    out = tmp_path / "run"
    res = launch(nproc, out, [f"model.init_from={path}", "train.freeze_backbone_steps=2", "data.source=synthetic"])
    assert f"init_from: {path}" in res.stdout + res.stderr
    ckpts = out / "checkpoints"
    for which in ("teacher", "student"):
        frozen = read_checkpoint_backbone(ckpts / "step_00000002", which)
        for key, value in weights.items():
            assert torch.equal(frozen[key], value), (which, key)
    trained = read_checkpoint_backbone(ckpts / "step_00000004", "student")
    assert not torch.equal(trained["blocks.1.mlp.fc1.weight"], weights["blocks.1.mlp.fc1.weight"])
    from virchow_fast.model.ssl import SSLNetwork

    cfg = load_config("configs/debug.yaml", TINY)
    torch.manual_seed(cfg.train.seed)  # the loop's initial heads: the frozen steps trained them
    initial = SSLNetwork(cfg.model, cfg.heads).dino_head.state_dict()
    heads = _heads(ckpts / "step_00000002", "student")
    assert any(not torch.equal(heads[f"student.dino_head.{k}"], v) for k, v in initial.items())
