"""Backbone weights from wherever a user has them: a timm-layout file, an export, or a run directory.

- A ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file in timm's ViT layout (Virchow 2's published
  ``model.safetensors`` / ``pytorch_model.bin``), optionally wrapped in ``{"state_dict": ...}`` or
  ``{"model": ...}``; a ``config.json`` beside it (timm's hub format, which ``export`` writes and
  Virchow 2 ships) gives the architecture and the normalisation.
- A run directory: the teacher (or student) backbone of its newest complete checkpoint (or of
  ``step``), read straight from the DCP files on every process that asks (no process group), and
  the model and normalisation from its ``resolved_config.yaml``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, build_section

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# timm architectures' defaults that the weights' shapes cannot tell (the head count)
ARCH_HEADS = {"vit_huge_patch14_224": 16, "vit_large_patch16_224": 16, "vit_large_patch14_224": 16,
              "vit_base_patch16_224": 12, "vit_base_patch14_224": 12, "vit_small_patch16_224": 6,
              "vit_small_patch14_224": 6, "vit_giant_patch14_224": 16}


log = logging.getLogger("virchow_fast.weights")


class WeightsError(ValueError):
    """Weights that cannot be used; ``str()`` is one line naming the file."""


@dataclass
class Weights:
    state: dict[str, torch.Tensor]  # timm layout (+ mask_token from a run)
    model: ModelConfig | None  # None where the caller brings its own (init_from)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    source: str = ""  # what was read, for messages and config.json
    step: int | None = None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return obj


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors / .pth / .pt / .bin file (CPU)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 (each format raises its own types)
        raise WeightsError(f"{path}: cannot read weights: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def model_config_from(state: dict[str, torch.Tensor], meta: dict, path: Path) -> ModelConfig:
    """Our ModelConfig for timm-layout ``state``: config.json's ``virchow_fast.model`` when present, else
    the shapes of the weights plus the head count from ``model_args`` or the architecture name."""
    if isinstance(meta.get("virchow_fast", {}).get("model"), dict):
        try:
            return build_section(ModelConfig, meta["virchow_fast"]["model"], "virchow_fast.model")
        except ConfigError as exc:
            raise WeightsError(f"{path}: config.json: {exc}") from None
    try:
        dim = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        regs = state["reg_token"].shape[1] if "reg_token" in state else 0
        hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1 - regs)
    except (KeyError, ValueError, IndexError) as exc:
        raise WeightsError(f"{path}: not a timm ViT state dict (no {exc})") from None
    args = meta.get("model_args", {})
    heads = args.get("num_heads") or ARCH_HEADS.get(meta.get("architecture", ""))
    if not heads:
        raise WeightsError(f"{path}: cannot tell the number of attention heads: put a config.json beside it with "
                           "model_args.num_heads or a known architecture")
    init = args.get("init_values", 1e-5) if "blocks.0.ls1.gamma" in state else 0.0
    return ModelConfig(patch_size=patch, img_size=args.get("img_size", grid * patch), embed_dim=dim, depth=depth,
                       num_heads=heads, mlp_hidden=hidden, num_registers=regs, layerscale_init=init or 0.0,
                       qkv_bias="blocks.0.attn.qkv.bias" in state)


def _from_file(path: Path, need_model: bool = True) -> Weights:
    state = read_file(path)
    meta: dict = {}
    cfg_json = path.with_name("config.json")
    if cfg_json.is_file():
        try:
            meta = json.loads(cfg_json.read_text())
        except ValueError as exc:
            raise WeightsError(f"{cfg_json}: not valid JSON: {exc}") from None
    pre = meta.get("pretrained_cfg", {})
    info = meta.get("virchow_fast", {})
    model = model_config_from(state, meta, path) if need_model else None
    return Weights(state, model, list(pre.get("mean", IMAGENET_MEAN)),
                   list(pre.get("std", IMAGENET_STD)), str(path), info.get("step"))


def run_config(run_dir: Path):
    """The run's resolved Config."""
    import yaml

    from ..config import Config

    resolved = run_dir / "resolved_config.yaml"
    if not resolved.is_file():
        raise WeightsError(f"{run_dir}: not a virchow-fast run directory (no resolved_config.yaml)")
    try:
        return build_section(Config, (yaml.safe_load(resolved.read_text()) or {}).get("config", {}), "")
    except (ConfigError, yaml.YAMLError) as exc:
        raise WeightsError(f"{resolved}: {str(exc).splitlines()[0]}") from None


def choose_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of ``step``, else the newest one, that passes its manifest (sizes and checksums).

    A damaged newest checkpoint is passed over for the one before it, with a warning naming it; a
    damaged ``step`` is an error. Nothing in the run directory is renamed or changed (this only reads).
    """
    from ..train.checkpoint import list_checkpoints
    from ..train.integrity import verify

    found = list_checkpoints(run_dir)
    if not found:
        raise WeightsError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
    have = ", ".join(str(int(c.name[5:])) for c in found)
    if step is not None:
        ckpt = next((c for c in found if c.name == f"step_{step:08d}"), None)
        if ckpt is None:
            raise WeightsError(f"{run_dir}: no complete checkpoint of step {step} (have: {have})")
        problem, _ = verify(ckpt, collective=False)
        if problem:
            raise WeightsError(f"{ckpt}: damaged ({problem}); choose another --step (have: {have})")
        return ckpt
    damaged = []
    for ckpt in reversed(found):
        problem, _ = verify(ckpt, collective=False)
        if problem is None:
            if damaged:
                log.warning("%s: damaged checkpoint(s) passed over (%s); reading %s", run_dir, "; ".join(damaged),
                            ckpt.name)
            return ckpt
        damaged.append(f"{ckpt.name}: {problem}")
    raise WeightsError(f"{run_dir}: no intact checkpoint ({'; '.join(damaged)})")


def read_checkpoint_backbone(ckpt: Path, which: str = "teacher") -> dict[str, torch.Tensor]:
    """``which``'s backbone tensors from a DCP checkpoint, full (whatever sharding wrote them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = f"{which}.backbone."
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    state = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise WeightsError(f"{ckpt}: holds no {which} backbone")
    nested = {which: {"backbone." + k: v for k, v in state.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, checkpoint_id=str(ckpt), no_dist=True)
    return {k[len("backbone."):]: v for k, v in nested[which].items()}


def _from_run(run_dir: Path, step: int | None, which: str) -> Weights:
    cfg = run_config(run_dir)
    ckpt = choose_checkpoint(run_dir, step)
    state = read_checkpoint_backbone(ckpt, which)
    crops = cfg.data.crops
    model = dataclasses.replace(cfg.model, init_from="")
    return Weights(state, model, list(crops.mean), list(crops.std), f"{ckpt} ({which})", int(ckpt.name[5:]))


def read_weights(path: str | Path, step: int | None = None, which: str = "teacher", need_model: bool = True) -> Weights:
    """Backbone weights, model config and normalisation from a file or a run directory."""
    p = Path(path)
    if which not in ("teacher", "student"):
        raise WeightsError(f"--which {which}: expected teacher or student")
    if p.is_dir():
        return _from_run(p, step, which)
    if not p.is_file():
        raise WeightsError(f"{p}: no such file or run directory")
    if p.suffix not in FILE_SUFFIXES:
        raise WeightsError(f"{p}: expected a run directory or a {' / '.join(FILE_SUFFIXES)} file")
    if step is not None:
        raise WeightsError(f"{p}: --step applies to a run directory, not to a file")
    return _from_file(p, need_model)


def load_model(path: str | Path, step: int | None = None, which: str = "teacher", device: str = "cpu"):
    """(VisionTransformer in eval mode with the weights, Weights) for embedding and evaluation."""
    from ..model.timm_compat import load_timm_state_dict
    from ..model.vit import VisionTransformer

    w = read_weights(path, step, which)
    with torch.device(device):
        model = VisionTransformer(w.model)
    load_timm_state_dict(model, w.state, w.source)
    return model.eval(), w


def init_backbone(backbone, path: str | Path) -> str:
    """Load ``path``'s weights into ``backbone`` (model.init_from) strictly; returns a one-line summary."""
    from ..model.timm_compat import load_timm_state_dict

    w = read_weights(path, need_model=False)
    notes = load_timm_state_dict(backbone, w.state, w.source)
    n = sum(v.numel() for v in w.state.values())
    return f"init_from: {w.source}: {len(w.state)} tensors, {n / 1e6:.2f}M values" + "".join(f"; {x}" for x in notes)
