"""Typed configuration: YAML in, ``--set a.b=v`` overrides, errors before any work starts.

Every section is a dataclass; the string under each field is its documentation. A component
receives only its own section. Derived values (scaled lr, step counts, token counts) are
computed once by :func:`derive` and saved with the run (``resolved_config.yaml``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_yaml import one_line, read_yaml


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file and the key."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    patch_size: int = _doc("patch side in pixels", 14)
    img_size: int = _doc("training size of the position embedding grid (global crop side)", 224)
    embed_dim: int = _doc("token width", 192)
    depth: int = _doc("number of transformer blocks", 4)
    num_heads: int = _doc("attention heads; embed_dim must divide by it", 3)
    mlp_hidden: int = _doc("SwiGLU hidden width (fc2 input); fc1 emits 2x this, packed [gate, value]", 512)
    num_registers: int = _doc("register tokens after the cls token", 4)
    layerscale_init: float = _doc("LayerScale initial value; 0 disables LayerScale", 1e-5)
    qkv_bias: bool = _doc("bias on the qkv projection", True)
    drop_path: float = _doc("stochastic depth rate of the last block (linear from 0)", 0.0)
    ln_eps: float = _doc("LayerNorm epsilon (timm ViTs use 1e-6)", 1e-6)
    init_from: str = _doc("start the backbone (student and teacher) from: a timm-layout .safetensors/.pth/.bin "
                          "(Virchow 2's), a file written by `export`, or a run directory (its newest teacher)", "")


@dataclass
class HeadConfig:
    dino_prototypes: int = _doc("K of the DINO head (cls token)", 4096)
    ibot_prototypes: int = _doc("K of the iBOT head (masked patch tokens)", 4096)
    hidden_dim: int = _doc("hidden width of the head MLP", 2048)
    bottleneck_dim: int = _doc("bottleneck width before L2 normalisation and the prototypes", 256)
    ibot_bottleneck_dim: int = _doc("bottleneck of the iBOT head when separate", 256)
    num_layers: int = _doc("layers of the head MLP (in->hidden->...->bottleneck)", 3)
    separate_ibot_head: bool = _doc("separate iBOT head (DINOv2 ViT-g) instead of sharing the DINO head", True)


@dataclass
class CropConfig:
    context_size: int = _doc("side of the context region read per tile (ECT), pixels", 392)
    global_size: int = _doc("global crop side, pixels", 224)
    local_size: int = _doc("local crop side, pixels", 98)
    n_global: int = _doc("global crops per tile (student and teacher)", 2)
    n_local: int = _doc("local crops per tile (student only)", 8)
    ect_scale: list[float] = _doc("ECT crop area scale range relative to the crop size", factory=lambda: [0.9, 1.1])
    ect_ratio: list[float] = _doc("ECT crop aspect-ratio range", factory=lambda: [0.95, 1.05])
    hflip: float = _doc("probability of a horizontal flip", 0.5)
    vflip: float = _doc("probability of a vertical flip", 0.5)
    rot90: bool = _doc("random multiples of 90-degree rotation", True)
    color_jitter: float = _doc("probability of colour jitter", 0.8)
    brightness: float = _doc("colour jitter brightness strength", 0.4)
    contrast: float = _doc("colour jitter contrast strength", 0.4)
    saturation: float = _doc("colour jitter saturation strength", 0.2)
    hue: float = _doc("colour jitter hue strength (tame for H&E)", 0.05)
    grayscale: float = _doc("probability of grayscale", 0.2)
    solarize: float = _doc("probability of solarise on the second global crop (0 for Virchow 2G)", 0.2)
    blur: float = _doc("probability of Gaussian blur (0 in Virchow 2)", 0.0)
    mean: list[float] = _doc("normalisation mean (ImageNet)", factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = _doc("normalisation std (ImageNet)", factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class MaskConfig:
    mask_probability: float = _doc("fraction of images whose global crops get iBOT masks", 0.5)
    ratio_min: float = _doc("smallest mask ratio", 0.1)
    ratio_max: float = _doc("largest mask ratio", 0.5)
    min_block_patches: int = _doc("smallest block area drawn, in patches; smaller blocks only to reach a "
                                  "mask's target when fewer patches remain (as DINOv2)", 4)
    aspect_min: float = _doc("block aspect ratio range lower end (upper is 1/this)", 0.3)


@dataclass
class DataConfig:
    source: str = _doc("tile source: synthetic | slides | shards | demo (generated slides in <run>/demo_slides)", "synthetic")
    paths: list[str] = _doc("slide files/folders, or shard folders, depending on source", factory=list)
    batch_size: int = _doc("tiles per process per step", 8)
    num_workers: int = _doc("reader worker processes", 0)
    device: str = _doc("augmentation device: auto | cpu | gpu", "auto")
    mags: list[float] = _doc("magnifications sampled", factory=lambda: [40.0, 20.0, 10.0, 5.0])
    mag_weights: list[float] = _doc("sampling weight per magnification", factory=lambda: [0.2, 0.4, 0.2, 0.2])
    mag_mpp: list[float] = _doc("microns per pixel per magnification", factory=lambda: [0.25, 0.5, 1.0, 2.0])
    min_tissue: float = _doc("keep tiles with at least this tissue fraction", 0.65)
    index_dir: str = _doc("tile index folder (slides source); empty = <run>/tiles", "")
    pipeline: str = _doc("augmentation path for slides/shards/demo: auto (dali if installed) | dali | torch", "auto")
    dali_threads: int = _doc("DALI CPU threads per process", 1)
    mpp: float = _doc("microns per pixel for slides whose metadata has none (0 = refuse such slides)", 0.0)
    demo_slides: int = _doc("source demo: number of generated slides (4096 x 3072 at 0.25 um/px)", 3)
    shard_reader: str = _doc("source shards: index (members by offset: exact resume, mag_weights) | webdataset "
                             "(DALI fn.readers.webdataset, shuffled per rank, resumes from DALI's checkpoint, "
                             "magnifications as written)", "index")
    crops: CropConfig = _doc("multi-crop / ECT augmentation", factory=CropConfig)
    masks: MaskConfig = _doc("iBOT block masks", factory=MaskConfig)


@dataclass
class LossConfig:
    dino_weight: float = _doc("weight of the DINO cls loss", 1.0)
    ibot_weight: float = _doc("weight of the iBOT masked-patch loss", 1.0)
    centering: str = _doc("teacher centering: sinkhorn | softmax", "sinkhorn")
    sinkhorn_iters: int = _doc("Sinkhorn-Knopp iterations", 3)
    center_momentum: float = _doc("EMA momentum of the softmax center", 0.9)
    student_temp: float = _doc("student softmax temperature", 0.1)
    teacher_temp: float = _doc("teacher temperature after warmup", 0.07)
    warmup_teacher_temp: float = _doc("teacher temperature at step 0", 0.04)
    warmup_teacher_temp_epochs: int = _doc("epochs of linear teacher-temperature warmup", 30)
    regularizer: str = _doc("cls regulariser: kde | koleo | none", "kde")
    regularizer_weight: float = _doc("weight of the regulariser (KDE 0.05, KoLeo 0.1)", 0.05)
    kde_kappa: float = _doc("KDE concentration kappa", 5.0)
    kde_self_term: bool = _doc("KDE sum includes j = i: false = ours (j != i); true = the one public "
                               "implementation's density, exactly minus its loss (that code minimises -log density, "
                               "which pulls features together: we keep our sign); the self term shrinks the "
                               "gradient by (e^kappa + S_i) / S_i, S_i = sum over j != i", False)


@dataclass
class OptimConfig:
    base_lr: float = _doc("peak lr at a global batch of 1024 (scaled by sqrt(batch/1024))", 2e-4)
    min_lr: float = _doc("final lr of the cosine", 1e-6)
    warmup_epochs: float = _doc("epochs of linear lr warmup", 10)
    weight_decay: float = _doc("weight decay at step 0", 0.04)
    weight_decay_end: float = _doc("weight decay at the end (cosine)", 0.2)
    betas: list[float] = _doc("AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = _doc("AdamW epsilon", 1e-8)
    clip_grad: float = _doc("gradient-norm clip; 0 disables", 3.0)
    layer_decay: float = _doc("layer-wise lr decay (1.0 = off)", 0.9)
    patch_embed_lr_mult: float = _doc("lr multiplier of the patch embedding", 0.2)
    freeze_last_layer_epochs: float = _doc("epochs with the heads' prototype layers frozen", 1)
    momentum_teacher: float = _doc("teacher EMA momentum at step 0", 0.994)
    momentum_teacher_end: float = _doc("teacher EMA momentum at the end (cosine)", 1.0)
    fused: str = _doc("fused AdamW: auto | on | off (auto = on for CUDA)", "auto")


def _ops_config() -> type:
    """One field per op of the op table (ops/table.py): ``ops.<op>: auto | <its backends>``."""
    from .ops.table import TABLE

    fields = [(name, str, _doc(f"{op.summary}: auto | {' | '.join(op.backends())}", "auto"))
              for name, op in TABLE.items()]
    cls = dataclasses.make_dataclass("OpsConfig", fields)
    cls.__module__ = __name__  # pickles and reads like the other sections
    return cls


OpsConfig = _ops_config()


def _renamed_ops() -> dict[str, str]:
    from .ops.table import RENAMED

    return RENAMED


@dataclass
class ParallelConfig:
    fsdp: str = _doc("FSDP2 sharding: auto (on when world > 1) | on | off", "auto")
    mixed_precision: str = _doc("compute dtype: bf16 | fp32 (bf16 needs CUDA or is emulated on CPU)", "fp32")
    activation_checkpointing: str = _doc("off | selective (keep matmul outputs, recompute the elementwise ops) | "
                                         "full | every_k | auto (the cheapest that fits the GPU's memory)", "off")
    ac_every: int = _doc("with every_k: checkpoint every k-th block", 2)
    compile: bool = _doc("torch.compile each block", False)
    backend: str = _doc("process group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo", "auto")
    shard_size: int = _doc("processes per FSDP shard group; the groups replicate each other (HSDP: gather "
                           "within a node, all-reduce across nodes). 0 = the launcher's LOCAL_WORLD_SIZE "
                           "(one node), or all processes without one", 0)


@dataclass
class TrainConfig:
    epochs: int = _doc("number of 'epochs' (DINOv2 style: steps_per_epoch steps each)", 2)
    steps_per_epoch: int = _doc("steps per epoch", 10)
    seed: int = _doc("base random seed (each rank offsets it)", 0)
    device: str = _doc("auto | cpu | cuda", "auto")
    output_dir: str = _doc("run directory", "runs/debug")
    checkpoint_every: int = _doc("checkpoint every N steps (and at the end)", 10)
    keep_checkpoints: int = _doc("keep the last N checkpoints", 2)
    log_every: int = _doc("without a terminal (batch logs): print a metrics line every N steps", 1)
    max_nonfinite_steps: int = _doc("stop after this many non-finite losses in a row", 5)
    peak_tflops: float = _doc("peak TFLOP/s per device for MFU (0 = detect)", 0.0)
    threads: int = _doc("torch CPU threads (0 = torch default)", 0)
    sync_timing: bool = _doc("wait for the device after every step, so compute_s is that step alone (the next "
                             "step's host work then no longer overlaps its tail); tiles/s is the time between "
                             "the steps' statistics reads either way", False)
    freeze_backbone_steps: int = _doc("train only the heads for the first N steps (backbone lr 0, teacher "
                                      "backbone EMA paused): for init_from weights that come without heads", 0)


@dataclass
class EvalConfig:
    every: int = _doc("every N steps: teacher kNN accuracy and RankMe on eval.train (0 = off)", 0)
    train: str = _doc("labelled tiles (ImageFolder tree, CSV of path,label, or PCam _x.h5) for eval.every", "")
    val: str = _doc("labelled query tiles; empty = leave-one-out kNN on eval.train", "")
    k: int = _doc("kNN neighbours (cosine similarity)", 20)
    max_tiles: int = _doc("at most this many tiles per set (a class-balanced, seeded subset)", 1000)


@dataclass
class Config:
    name: str = _doc("run name", "debug")
    model: ModelConfig = _doc("backbone", factory=ModelConfig)
    heads: HeadConfig = _doc("DINO / iBOT heads", factory=HeadConfig)
    data: DataConfig = _doc("data source and augmentation", factory=DataConfig)
    loss: LossConfig = _doc("losses", factory=LossConfig)
    optim: OptimConfig = _doc("optimizer and schedules", factory=OptimConfig)
    ops: OpsConfig = _doc("kernel backend per op", factory=OpsConfig)
    parallel: ParallelConfig = _doc("distributed training", factory=ParallelConfig)
    train: TrainConfig = _doc("loop", factory=TrainConfig)
    eval: EvalConfig = _doc("evaluation during training", factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off (fsdp: on, activation_checkpointing: off) as a bool
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            if where == "ops" and key in _renamed_ops():
                raise ConfigError(f"ops.{key}: renamed ops.{_renamed_ops()[key]}")
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known: {known})".lstrip("."))
    obj = cls()
    for key, value in data.items():
        setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}".lstrip(".")))
    return obj


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {exc}") from None
    return key.strip(), value


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package (``configs/*.yaml`` of the repository)."""
    from importlib.resources import files

    return sorted(f.name[:-5] for f in files("virchow_fast.configs").iterdir() if f.name.endswith(".yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else a shipped config of that name (``vit_h14_virchow2``)."""
    p = Path(path)
    if p.is_file() or len(p.parts) != 1 or p.suffix not in ("", ".yaml"):
        return p
    from importlib.resources import as_file, files

    shipped = files("virchow_fast.configs") / f"{p.stem}.yaml"
    if not shipped.is_file():
        return p
    with as_file(shipped) as real:  # a plain file for every install kind but a zipped one
        return Path(real)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at ``path`` (None = defaults), apply ``a.b=v`` overrides, validate.

    Every error is a :class:`ConfigError` naming the file and the key.
    """
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file (shipped configs: {', '.join(shipped_configs())})")
        try:
            tree = read_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {one_line(exc)}") from None
        if tree is None:
            raise ConfigError(f"{source}: the file is empty (no settings): it would train on the defaults")
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(value: str, key: str, options: tuple[str, ...]) -> None:
    _check(value in options, key, f"{value!r} is not one of {', '.join(options)}")


def validate(cfg: Config) -> None:
    """Impossible values fail here, before any work starts."""
    m, c, h = cfg.model, cfg.data.crops, cfg.heads
    for key in ("patch_size", "img_size", "embed_dim", "depth", "num_heads", "mlp_hidden"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    _check(m.num_registers >= 0, "model.num_registers", "must be >= 0")
    _check(m.embed_dim % m.num_heads == 0, "model.embed_dim",
           f"{m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    _check(m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} is not divisible by model.patch_size={m.patch_size}")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
    for key in ("global_size", "local_size"):
        size = getattr(c, key)
        _check(size > 0 and size % m.patch_size == 0, f"data.crops.{key}",
               f"{size} is not a positive multiple of model.patch_size={m.patch_size}")
    _check(c.context_size >= c.global_size * 1.05, "data.crops.context_size",
           f"{c.context_size} leaves no room to translate a {c.global_size} px global crop")
    _check(c.n_global >= 1, "data.crops.n_global", "must be >= 1")
    _check(c.n_local >= 0, "data.crops.n_local", "must be >= 0")
    for key in ("ect_scale", "ect_ratio"):
        lo_hi = getattr(c, key)
        _check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"data.crops.{key}", "must be [low, high] with 0 < low <= high")
    _check(c.ect_scale[1] * c.ect_ratio[1] * c.global_size ** 2 <= c.context_size ** 2,
           "data.crops.ect_scale", "largest global crop does not fit in the context")
    _check(c.ect_scale[1] * c.ect_ratio[1] * c.local_size ** 2 <= c.context_size ** 2, "data.crops.local_size",
           f"{c.local_size} px (at the largest ECT scale and ratio) does not fit in the {c.context_size} px context")
    for key in ("hflip", "vflip", "color_jitter", "grayscale", "solarize", "blur"):
        _check(0.0 <= getattr(c, key) <= 1.0, f"data.crops.{key}", "must be a probability in [0, 1]")
    _check(len(c.mean) == 3 and len(c.std) == 3 and min(c.std) > 0, "data.crops.std", "mean/std need 3 entries, std > 0")
    mk = cfg.data.masks
    _check(0.0 <= mk.mask_probability <= 1.0, "data.masks.mask_probability", "must be in [0, 1]")
    _check(0.0 <= mk.ratio_min <= mk.ratio_max < 1.0, "data.masks.ratio_min", "need 0 <= ratio_min <= ratio_max < 1")
    _check(0 < mk.aspect_min <= 1.0, "data.masks.aspect_min", "must be in (0, 1]")
    d = cfg.data
    _choice(d.source, "data.source", ("synthetic", "slides", "shards", "demo"))
    _choice(d.pipeline, "data.pipeline", ("auto", "dali", "torch"))
    _check(d.dali_threads >= 1, "data.dali_threads", "must be >= 1")
    _check(d.mpp >= 0, "data.mpp", "must be >= 0 (0 = from the slide metadata)")
    _check(d.demo_slides >= 1, "data.demo_slides", "must be >= 1")
    _choice(d.shard_reader, "data.shard_reader", ("index", "webdataset"))
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _choice(d.device, "data.device", ("auto", "cpu", "gpu"))
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(len(d.mags) == len(d.mag_weights) == len(d.mag_mpp) and len(d.mags) > 0, "data.mag_weights",
           "data.mags, data.mag_weights and data.mag_mpp need the same non-zero length")
    _check(min(d.mag_weights) >= 0 and sum(d.mag_weights) > 0, "data.mag_weights", "must be >= 0 with a positive sum")
    for key in ("mags", "mag_mpp"):
        _check(min(getattr(d, key)) > 0, f"data.{key}", f"must be positive, got {getattr(d, key)}")
    _check(0.0 <= d.min_tissue <= 1.0, "data.min_tissue", "must be in [0, 1]")
    if d.source in ("slides", "shards"):
        _check(len(d.paths) > 0, "data.paths", f"needs at least one path for source {d.source!r}")
    for key in ("dino_prototypes", "ibot_prototypes", "hidden_dim", "bottleneck_dim", "ibot_bottleneck_dim"):
        _check(getattr(h, key) > 0, f"heads.{key}", "must be positive")
    _check(h.num_layers >= 1, "heads.num_layers", "must be >= 1")
    lo = cfg.loss
    _choice(lo.centering, "loss.centering", ("sinkhorn", "softmax"))
    _choice(lo.regularizer, "loss.regularizer", ("kde", "koleo", "none"))
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _check(getattr(lo, key) > 0, f"loss.{key}", "must be positive")
    _check(lo.sinkhorn_iters >= 1, "loss.sinkhorn_iters", "must be >= 1")
    for key in ("dino_weight", "ibot_weight", "regularizer_weight"):
        _check(getattr(lo, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(lo, key)}")
    _check(lo.kde_kappa > 0, "loss.kde_kappa", "must be positive")
    if lo.regularizer != "none":
        _check(d.batch_size >= 2, "data.batch_size", f"the {lo.regularizer} regulariser needs >= 2 tiles per process")
    o = cfg.optim
    _check(o.base_lr > 0, "optim.base_lr", "must be positive")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "need two values in [0, 1)")
    _check(0 < o.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1]")
    _check(0 <= o.momentum_teacher <= o.momentum_teacher_end <= 1.0, "optim.momentum_teacher",
           "need 0 <= momentum_teacher <= momentum_teacher_end <= 1")
    _choice(o.fused, "optim.fused", ("auto", "on", "off"))
    from .ops.table import TABLE

    for key, op in TABLE.items():
        _choice(getattr(cfg.ops, key), f"ops.{key}", ("auto",) + op.backends())
    p = cfg.parallel
    _choice(p.fsdp, "parallel.fsdp", ("auto", "on", "off"))
    _choice(p.mixed_precision, "parallel.mixed_precision", ("bf16", "fp32"))
    _choice(p.activation_checkpointing, "parallel.activation_checkpointing",
            ("off", "selective", "full", "every_k", "auto"))
    _check(p.ac_every >= 1, "parallel.ac_every", "must be >= 1")
    _check(p.shard_size >= 0, "parallel.shard_size", "must be >= 0 (0 = one node)")
    _choice(p.backend, "parallel.backend", ("auto", "nccl", "gloo"))
    t = cfg.train
    _check(t.epochs >= 1 and t.steps_per_epoch >= 1, "train.epochs", "epochs and steps_per_epoch must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    for key, value in (("optim.warmup_epochs", cfg.optim.warmup_epochs),
                       ("loss.warmup_teacher_temp_epochs", lo.warmup_teacher_temp_epochs),
                       ("optim.freeze_last_layer_epochs", cfg.optim.freeze_last_layer_epochs)):
        if value > t.epochs:  # possible, so a warning: the schedule never reaches its end value
            logging.getLogger("virchow_fast.config").warning(
                "%s=%s is longer than train.epochs=%s: that warmup never ends", key, value, t.epochs)
    _check(t.freeze_backbone_steps >= 0, "train.freeze_backbone_steps", "must be >= 0")
    ev = cfg.eval
    _check(ev.every >= 0 and ev.k >= 1 and ev.max_tiles >= 2, "eval.every", "need every >= 0, k >= 1, max_tiles >= 2")
    _check(ev.every == 0 or bool(ev.train), "eval.train", "eval.every > 0 needs a labelled tile set")
    for key in ("train", "val"):
        _check(not getattr(ev, key) or Path(getattr(ev, key)).exists(), f"eval.{key}", f"{getattr(ev, key)} does not exist")
    _check(not m.init_from or Path(m.init_from).exists(), "model.init_from", f"{m.init_from} does not exist")


# ---------------------------------------------------------------------------------------------
# Derived values
# ---------------------------------------------------------------------------------------------

def derive(cfg: Config, world_size: int = 1) -> dict:
    """Values computed once from the config and saved with the run."""
    m, c = cfg.model, cfg.data.crops
    global_batch = cfg.data.batch_size * world_size
    prefix = 1 + m.num_registers
    return {
        "world_size": world_size,
        "global_batch": global_batch,
        "peak_lr": cfg.optim.base_lr * math.sqrt(global_batch / 1024.0),
        "total_steps": cfg.train.epochs * cfg.train.steps_per_epoch,
        "global_patches": (c.global_size // m.patch_size) ** 2,
        "local_patches": (c.local_size // m.patch_size) ** 2,
        "global_tokens": (c.global_size // m.patch_size) ** 2 + prefix,
        "local_tokens": (c.local_size // m.patch_size) ** 2 + prefix,
    }


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def save_resolved(cfg: Config, derived: dict, path: str | os.PathLike) -> None:
    """Write the resolved config and its derived values, atomically."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump({"config": to_dict(cfg), "derived": derived}, sort_keys=False))
    os.replace(tmp, p)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, documentation (for ``virchow-fast config-help``)."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
