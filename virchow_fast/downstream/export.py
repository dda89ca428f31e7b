"""``export``: a run's backbone as timm-layout safetensors plus timm's ``config.json``.

The pair loads into timm strictly, without a network::

    model = timm.create_model("vit_huge_patch14_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file="out/model.safetensors"),
                              mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                              **json.load(open("out/config.json"))["model_args"])

(:func:`timm_model` does exactly that, with the mean/std of the run). ``config.json`` follows the
layout timm reads from a model hub folder (``architecture``, ``model_args``, ``pretrained_cfg``)
and Virchow 2 ships; ``virchow_fast`` adds our exact model config, the run, step and network.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..logs import ensure_logging
from ..model.timm_compat import OURS_ONLY, TIMM_ARCH, json_kwargs
from .weights import WeightsError, read_weights


def config_json(w, which: str) -> dict:
    """timm's hub config for weights ``w`` (see module doc)."""
    size = w.model.img_size
    return {
        "architecture": TIMM_ARCH,
        "num_classes": 0,
        "num_features": w.model.embed_dim,
        "global_pool": "",
        "model_args": json_kwargs(w.model),
        "pretrained_cfg": {"tag": "virchow_fast", "input_size": [3, size, size], "fixed_input_size": False,
                           "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": w.mean,
                           "std": w.std, "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"},
        "virchow_fast": {"model": dataclasses.asdict(w.model), "source": w.source, "step": w.step, "which": which,
                         "timm_layers": {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}},
    }


def export(run_dir: str | Path, out: str | Path, step: int | None = None, which: str = "teacher",
           overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (safetensors) and ``config.json`` beside it; returns both paths."""
    from safetensors.torch import save_file

    ensure_logging()
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise WeightsError(f"{run_dir}: not a run directory")
    if out.suffix != ".safetensors":
        raise WeightsError(f"--out {out}: expected a .safetensors file name")
    cfg_path = out.with_name("config.json")
    if not overwrite:
        for p in (out, cfg_path):
            if p.exists():
                raise WeightsError(f"{p} exists; pass --overwrite to replace it")
    w = read_weights(run_dir, step, which)
    state = {k: v.contiguous() for k, v in w.state.items() if k not in OURS_ONLY}
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = config_json(w, which)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "source": w.source})
    os.replace(tmp, out)
    tmp_cfg = cfg_path.with_name("config.json.tmp")
    tmp_cfg.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_cfg, cfg_path)
    return out, cfg_path


def write_model(path: str | Path, model, mean=None, std=None) -> Path:
    """A bare VisionTransformer as an export is written (weights + config.json beside); returns ``path``."""
    from safetensors.torch import save_file

    from ..model.timm_compat import export_timm_state_dict
    from .weights import IMAGENET_MEAN, IMAGENET_STD, Weights

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(export_timm_state_dict(model), str(path))
    w = Weights({}, model.cfg, list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD), "in memory")
    path.with_name("config.json").write_text(json.dumps(config_json(w, "backbone"), indent=2) + "\n")
    return path


def timm_model(weights: str | Path):
    """A timm model loaded strictly from an exported (or Virchow 2) folder's weights + config.json."""
    import timm
    import torch.nn as nn

    weights = Path(weights)
    meta = json.loads(weights.with_name("config.json").read_text())
    pre = meta.get("pretrained_cfg", {})
    overlay = {"file": str(weights), "num_classes": 0}
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct"):
        if key in pre:
            overlay[key] = tuple(pre[key]) if isinstance(pre[key], list) else pre[key]
    return timm.create_model(meta.get("architecture", TIMM_ARCH), pretrained=True, pretrained_cfg_overlay=overlay,
                             mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU, **meta["model_args"])
