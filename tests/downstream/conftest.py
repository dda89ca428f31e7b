"""Tiny models, timm-layout weight files and a short training run shared by the downstream tests."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]

# 48-wide, 2 blocks, 2 registers, 42 px crops (3 x 3 patches of 14): the shapes of tests/train/distrun.py
MODEL = ["model.embed_dim=48", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=64", "model.img_size=42",
         "model.num_registers=2", "model.drop_path=0", "model.layerscale_init=0.5"]
RUN = MODEL + [
    "heads.dino_prototypes=64", "heads.ibot_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "heads.ibot_bottleneck_dim=16", "data.source=synthetic", "data.num_workers=0", "data.batch_size=4",
    "data.crops.global_size=42", "data.crops.local_size=14", "data.crops.n_local=2", "data.crops.context_size=48",
    "data.masks.min_block_patches=1", "train.threads=1", "train.device=cpu", "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0", "loss.warmup_teacher_temp_epochs=1", "train.epochs=1",
    "train.steps_per_epoch=2", "train.checkpoint_every=1", "train.keep_checkpoints=2",
]


def tiny_config(*extra: str):
    from virchow_fast.config import load_config

    return load_config(ROOT / "configs" / "debug.yaml", RUN + list(extra))


def random_backbone(seed: int, *extra: str):
    """A VisionTransformer of the tiny shape with random weights (seeded), eval mode."""
    from virchow_fast.model.vit import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(tiny_config(*extra).model).eval()
    with torch.no_grad():  # make every parameter distinct from the init constants
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-step run directory (checkpoints at steps 1 and 2)."""
    from virchow_fast.train.loop import run

    out = tmp_path_factory.mktemp("run")
    run(tiny_config(f"train.output_dir={out}"))
    return out


def labelled_tile(cls: int, seed: int, size: int = 56):
    """An H&E-like tile whose class sets its texture and stain: 0 pink stroma with few small nuclei,
    1 crowded large purple nuclei (tumour-like), 2 pale, sparse, bluish (a third stain)."""
    import numpy as np

    from virchow_fast.data.synthetic import he_image

    rng = np.random.default_rng(1000 * cls + seed)
    mag = (10.0, 40.0, 20.0)[cls]
    img = he_image(rng, size, magnification=mag, tissue_fraction=1.0).astype(np.float32)
    tint = np.array([(1.0, 1.0, 1.0), (0.85, 0.8, 1.05), (0.95, 1.0, 1.1)][cls], dtype=np.float32)
    return np.clip(img * tint, 0, 255).astype(np.uint8)


def write_image_folder(root, n_per_class: int, classes=("0_stroma", "1_tumour", "2_other"), seed: int = 0,
                       size: int = 56):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(labelled_tile(c, seed + i, size)).save(root / name / f"{name}-{i:03d}.png")
    return root


def save_model(path, model):
    """Weights + config.json as an export writes them, for a bare VisionTransformer."""
    from virchow_fast.downstream.export import write_model

    return write_model(path, model)
