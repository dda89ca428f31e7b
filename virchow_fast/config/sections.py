"""The config sections: one dataclass each, the documentation under every field, the checks beside them.

A choice field is a ``Literal`` (the loader refuses any other value, naming it and the choices).
Each section's ``check(where)`` holds the checks of its own fields; :meth:`Config.check` adds the few
that join sections (crop sizes and the patch size, the regulariser and the batch). Every failed check
is a :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the file and the key."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _probabilities(section: Any, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        _check(0.0 <= getattr(section, key) <= 1.0, f"{where}.{key}", "must be a probability in [0, 1]")


def _positive(section: Any, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        _check(getattr(section, key) > 0, f"{where}.{key}", "must be positive")


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

    def check(self, where: str = "model") -> None:
        _positive(self, where, ("patch_size", "img_size", "embed_dim", "depth", "num_heads", "mlp_hidden"))
        _check(self.num_registers >= 0, f"{where}.num_registers", "must be >= 0")
        _check(self.embed_dim % self.num_heads == 0, f"{where}.embed_dim",
               f"{self.embed_dim} is not divisible by {where}.num_heads={self.num_heads}")
        _check(self.img_size % self.patch_size == 0, f"{where}.img_size",
               f"{self.img_size} is not divisible by {where}.patch_size={self.patch_size}")
        _check(0.0 <= self.drop_path < 1.0, f"{where}.drop_path", "must be in [0, 1)")
        _check(not self.init_from or Path(self.init_from).exists(), f"{where}.init_from",
               f"{self.init_from} does not exist")


@dataclass
class HeadConfig:
    dino_prototypes: int = _doc("K of the DINO head (cls token)", 4096)
    ibot_prototypes: int = _doc("K of the iBOT head (masked patch tokens)", 4096)
    hidden_dim: int = _doc("hidden width of the head MLP", 2048)
    bottleneck_dim: int = _doc("bottleneck width before L2 normalisation and the prototypes", 256)
    ibot_bottleneck_dim: int = _doc("bottleneck of the iBOT head when separate", 256)
    num_layers: int = _doc("layers of the head MLP (in->hidden->...->bottleneck)", 3)
    separate_ibot_head: bool = _doc("separate iBOT head (DINOv2 ViT-g) instead of sharing the DINO head", True)

    def check(self, where: str = "heads") -> None:
        _positive(self, where, ("dino_prototypes", "ibot_prototypes", "hidden_dim", "bottleneck_dim",
                                "ibot_bottleneck_dim"))
        _check(self.num_layers >= 1, f"{where}.num_layers", "must be >= 1")


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

    def check(self, where: str = "data.crops") -> None:
        _check(self.n_global >= 1, f"{where}.n_global", "must be >= 1")
        _check(self.n_local >= 0, f"{where}.n_local", "must be >= 0")
        for key in ("ect_scale", "ect_ratio"):
            lo_hi = getattr(self, key)
            _check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"{where}.{key}",
                   "must be [low, high] with 0 < low <= high")
        _check(self.context_size >= self.global_size * 1.05, f"{where}.context_size",
               f"{self.context_size} leaves no room to translate a {self.global_size} px global crop")
        _check(self.context_size <= 16384, f"{where}.context_size",  # one read region per tile stays a few MB
               f"{self.context_size} is larger than 16384 px")
        largest = self.ect_scale[1] * self.ect_ratio[1]
        _check(largest * self.global_size ** 2 <= self.context_size ** 2, f"{where}.ect_scale",
               "largest global crop does not fit in the context")
        _check(largest * self.local_size ** 2 <= self.context_size ** 2, f"{where}.local_size",
               f"{self.local_size} px (at the largest ECT scale and ratio) does not fit in the "
               f"{self.context_size} px context")
        _probabilities(self, where, ("hflip", "vflip", "color_jitter", "grayscale", "solarize", "blur"))
        _check(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, f"{where}.std",
               "mean/std need 3 entries, std > 0")


@dataclass
class MaskConfig:
    mask_probability: float = _doc("fraction of images whose global crops get iBOT masks", 0.5)
    ratio_min: float = _doc("smallest mask ratio", 0.1)
    ratio_max: float = _doc("largest mask ratio", 0.5)
    min_block_patches: int = _doc("smallest block area drawn, in patches; smaller blocks only to reach a "
                                  "mask's target when fewer patches remain (as DINOv2)", 4)
    aspect_min: float = _doc("block aspect ratio range lower end (upper is 1/this)", 0.3)

    def check(self, where: str = "data.masks") -> None:
        _probabilities(self, where, ("mask_probability",))
        _check(0.0 <= self.ratio_min <= self.ratio_max < 1.0, f"{where}.ratio_min",
               "need 0 <= ratio_min <= ratio_max < 1")
        _check(0 < self.aspect_min <= 1.0, f"{where}.aspect_min", "must be in (0, 1]")


@dataclass
class DataConfig:
    source: Literal["synthetic", "slides", "shards", "demo"] = _doc(
        "tile source: synthetic | slides | shards | demo (generated slides in <run>/demo_slides)", "synthetic")
    paths: list[str] = _doc("slide files/folders, or shard folders, depending on source", factory=list)
    batch_size: int = _doc("tiles per process per step", 8)
    num_workers: int = _doc("reader worker processes", 0)
    device: Literal["auto", "cpu", "gpu"] = _doc("augmentation device: auto | cpu | gpu", "auto")
    mags: list[float] = _doc("magnifications sampled", factory=lambda: [40.0, 20.0, 10.0, 5.0])
    mag_weights: list[float] = _doc("sampling weight per magnification", factory=lambda: [0.2, 0.4, 0.2, 0.2])
    mag_mpp: list[float] = _doc("microns per pixel per magnification", factory=lambda: [0.25, 0.5, 1.0, 2.0])
    min_tissue: float = _doc("keep tiles with at least this tissue fraction", 0.65)
    index_dir: str = _doc("tile index folder (slides source); empty = <run>/tiles", "")
    pipeline: Literal["auto", "dali", "torch"] = _doc(
        "augmentation path for slides/shards/demo: auto (dali if installed) | dali | torch", "auto")
    dali_threads: int = _doc("DALI CPU threads per process", 1)
    mpp: float = _doc("microns per pixel for slides whose metadata has none (0 = refuse such slides)", 0.0)
    demo_slides: int = _doc("source demo: number of generated slides (4096 x 3072 at 0.25 um/px)", 3)
    shard_reader: Literal["index", "webdataset"] = _doc(
        "source shards: index (members by offset: exact resume, mag_weights) | webdataset (DALI "
        "fn.readers.webdataset, shuffled per rank, resumes from DALI's checkpoint, magnifications as written)",
        "index")
    crops: CropConfig = _doc("multi-crop / ECT augmentation", factory=CropConfig)
    masks: MaskConfig = _doc("iBOT block masks", factory=MaskConfig)

    def check(self, where: str = "data") -> None:
        _check(self.dali_threads >= 1, f"{where}.dali_threads", "must be >= 1")
        _check(self.mpp >= 0, f"{where}.mpp", "must be >= 0 (0 = from the slide metadata)")
        _check(self.demo_slides >= 1, f"{where}.demo_slides", "must be >= 1")
        _check(self.num_workers >= 0, f"{where}.num_workers", "must be >= 0")
        _check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        _check(len(self.mags) == len(self.mag_weights) == len(self.mag_mpp) and len(self.mags) > 0,
               f"{where}.mag_weights", f"{where}.mags, {where}.mag_weights and {where}.mag_mpp need the same "
               "non-zero length")
        _check(min(self.mag_weights) >= 0 and sum(self.mag_weights) > 0, f"{where}.mag_weights",
               "must be >= 0 with a positive sum")
        for key in ("mags", "mag_mpp"):
            _check(min(getattr(self, key)) > 0, f"{where}.{key}", f"must be positive, got {getattr(self, key)}")
        _check(len(set(self.mags)) == len(self.mags), f"{where}.mags", f"must be distinct, got {self.mags}")
        _check(0.0 <= self.min_tissue <= 1.0, f"{where}.min_tissue", "must be in [0, 1]")
        if self.source in ("slides", "shards"):
            _check(len(self.paths) > 0, f"{where}.paths", f"needs at least one path for source {self.source!r}")
        self.crops.check(f"{where}.crops")
        self.masks.check(f"{where}.masks")


@dataclass
class LossConfig:
    dino_weight: float = _doc("weight of the DINO cls loss", 1.0)
    ibot_weight: float = _doc("weight of the iBOT masked-patch loss", 1.0)
    centering: Literal["sinkhorn", "softmax"] = _doc("teacher centering: sinkhorn | softmax", "sinkhorn")
    sinkhorn_iters: int = _doc("Sinkhorn-Knopp iterations", 3)
    center_momentum: float = _doc("EMA momentum of the softmax center", 0.9)
    student_temp: float = _doc("student softmax temperature", 0.1)
    teacher_temp: float = _doc("teacher temperature after warmup", 0.07)
    warmup_teacher_temp: float = _doc("teacher temperature at step 0", 0.04)
    warmup_teacher_temp_epochs: int = _doc("epochs of linear teacher-temperature warmup", 30)
    regularizer: Literal["kde", "koleo", "none"] = _doc("cls regulariser: kde | koleo | none", "kde")
    regularizer_weight: float = _doc("weight of the regulariser (KDE 0.05, KoLeo 0.1)", 0.05)
    kde_kappa: float = _doc("KDE concentration kappa", 5.0)
    kde_self_term: bool = _doc("KDE sum includes j = i: false = ours (j != i); true = the one public "
                               "implementation's density, exactly minus its loss (that code minimises -log density, "
                               "which pulls features together: we keep our sign); the self term shrinks the "
                               "gradient by (e^kappa + S_i) / S_i, S_i = sum over j != i", False)

    def check(self, where: str = "loss") -> None:
        _positive(self, where, ("student_temp", "teacher_temp", "warmup_teacher_temp", "kde_kappa"))
        _check(self.sinkhorn_iters >= 1, f"{where}.sinkhorn_iters", "must be >= 1")
        for key in ("dino_weight", "ibot_weight", "regularizer_weight"):
            _check(getattr(self, key) >= 0, f"{where}.{key}", f"must be >= 0, got {getattr(self, key)}")


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
    fused: Literal["auto", "on", "off"] = _doc(
        "the fused update (AdamW, EMA, weights check, compute copies in one kernel pass on CUDA; torch's fused "
        "AdamW elsewhere): auto | on | off (auto = on for CUDA)", "auto")

    def check(self, where: str = "optim") -> None:
        # an AdamW step moves each weight by about lr: above 1 the first update already wrecks the weights
        _check(0 < self.base_lr <= 1.0, f"{where}.base_lr", f"must be in (0, 1], got {self.base_lr}")
        _check(0 <= self.min_lr <= 1.0, f"{where}.min_lr", f"must be in [0, 1], got {self.min_lr}")
        _check(self.eps > 0, f"{where}.eps", f"must be positive, got {self.eps}")
        for key in ("warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "patch_embed_lr_mult",
                    "freeze_last_layer_epochs"):
            _check(getattr(self, key) >= 0, f"{where}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{where}.betas",
               "need two values in [0, 1)")
        _check(0 < self.layer_decay <= 1.0, f"{where}.layer_decay", "must be in (0, 1]")
        _check(0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1.0, f"{where}.momentum_teacher",
               "need 0 <= momentum_teacher <= momentum_teacher_end <= 1")


def _ops_config() -> type:
    """One field per op of the op table (ops/table.py): ``ops.<op>: auto | <its backends>``."""
    from ..ops.table import TABLE

    fields = [(name, Literal[("auto",) + op.backends()],
               _doc(f"{op.summary}: auto | {' | '.join(op.backends())}", "auto")) for name, op in TABLE.items()]
    cls = dataclasses.make_dataclass("OpsConfig", fields, namespace={"check": lambda self, where="ops": None})
    cls.__module__ = __name__  # pickles and reads like the other sections
    return cls


OpsConfig = _ops_config()


@dataclass
class ParallelConfig:
    fsdp: Literal["auto", "on", "off"] = _doc("FSDP2 sharding: auto (on when world > 1) | on | off", "auto")
    mixed_precision: Literal["bf16", "fp32"] = _doc(
        "compute dtype: bf16 | fp32 (bf16 needs CUDA or is emulated on CPU)", "fp32")
    activation_checkpointing: Literal["off", "selective", "full", "every_k", "auto"] = _doc(
        "off | selective (keep matmul outputs, recompute the elementwise ops) | full | every_k | auto (the "
        "cheapest that fits the GPU's memory)", "off")
    ac_every: int = _doc("with every_k: checkpoint every k-th block", 2)
    compile: bool = _doc("torch.compile each block", False)
    backend: Literal["auto", "nccl", "gloo"] = _doc(
        "process group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo", "auto")
    shard_size: int = _doc("processes per FSDP shard group; the groups replicate each other (HSDP: gather "
                           "within a node, all-reduce across nodes). 0 = the launcher's LOCAL_WORLD_SIZE "
                           "(one node), or all processes without one", 0)

    def check(self, where: str = "parallel") -> None:
        _check(self.ac_every >= 1, f"{where}.ac_every", "must be >= 1")
        _check(self.shard_size >= 0, f"{where}.shard_size", "must be >= 0 (0 = one node)")


@dataclass
class TrainConfig:
    epochs: int = _doc("number of 'epochs' (DINOv2 style: steps_per_epoch steps each)", 2)
    steps_per_epoch: int = _doc("steps per epoch", 10)
    seed: int = _doc("base random seed (each rank offsets it)", 0)
    device: Literal["auto", "cpu", "cuda"] = _doc("auto | cpu | cuda", "auto")
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

    def check(self, where: str = "train") -> None:
        _check(self.epochs >= 1 and self.steps_per_epoch >= 1, f"{where}.epochs",
               "epochs and steps_per_epoch must be >= 1")
        for key in ("checkpoint_every", "keep_checkpoints", "log_every"):
            _check(getattr(self, key) >= 1, f"{where}.{key}", "must be >= 1")
        _check(self.freeze_backbone_steps >= 0, f"{where}.freeze_backbone_steps", "must be >= 0")


@dataclass
class EvalConfig:
    every: int = _doc("every N steps: teacher kNN accuracy and RankMe on eval.train (0 = off)", 0)
    train: str = _doc("labelled tiles (ImageFolder tree, CSV of path,label, or PCam _x.h5) for eval.every", "")
    val: str = _doc("labelled query tiles; empty = leave-one-out kNN on eval.train", "")
    k: int = _doc("kNN neighbours (cosine similarity)", 20)
    max_tiles: int = _doc("at most this many tiles per set (a class-balanced, seeded subset)", 1000)

    def check(self, where: str = "eval") -> None:
        _check(self.every >= 0 and self.k >= 1 and self.max_tiles >= 2, f"{where}.every",
               "need every >= 0, k >= 1, max_tiles >= 2")
        _check(self.every == 0 or bool(self.train), f"{where}.train", "eval.every > 0 needs a labelled tile set")
        for key in ("train", "val"):
            path = getattr(self, key)
            _check(not path or Path(path).exists(), f"{where}.{key}", f"{path} does not exist")


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

    def check(self) -> None:
        """Every section's own checks, then those that join sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check(f.name)
        m, c, d = self.model, self.data.crops, self.data
        for key in ("global_size", "local_size"):
            size = getattr(c, key)
            _check(size > 0 and size % m.patch_size == 0, f"data.crops.{key}",
                   f"{size} is not a positive multiple of model.patch_size={m.patch_size}")
        if self.loss.regularizer != "none":
            _check(d.batch_size >= 2, "data.batch_size",
                   f"the {self.loss.regularizer} regulariser needs >= 2 tiles per process")
        for key, value in (("optim.warmup_epochs", self.optim.warmup_epochs),
                           ("loss.warmup_teacher_temp_epochs", self.loss.warmup_teacher_temp_epochs),
                           ("optim.freeze_last_layer_epochs", self.optim.freeze_last_layer_epochs)):
            if value > self.train.epochs:  # possible, so a warning: the schedule never reaches its end value
                logging.getLogger("virchow_fast.config").warning(
                    "%s=%s is longer than train.epochs=%s: that warmup never ends", key, value, self.train.epochs)
