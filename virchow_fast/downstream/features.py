"""Frozen tile embeddings: preprocessing per the model's config.json, batched forward, bf16 on a GPU.

``mode`` "cls+mean" is Virchow's tile embedding, concat(cls token, mean of the patch tokens)
[N, 2C]; "cls" is the cls token alone [N, C]. Tiles are resized (shorter side, bicubic) and
centre-cropped to the model's input size, then normalised with its mean/std.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from ..model.vit import tile_embedding

MODES = ("cls+mean", "cls")


def fit_tile(img: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [size, size, 3]: shorter side to ``size`` (bicubic), centre crop."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    from PIL import Image

    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


def normalise(batch: np.ndarray, mean, std, device) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S] on ``device``, (x / 255 - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the embeddings come out fp32); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_batch(model, images: torch.Tensor, mode: str = "cls+mean") -> torch.Tensor:
    """images [N, 3, S, S] normalised -> fp32 embeddings [N, 2C] (cls+mean) or [N, C] (cls)."""
    with autocast_for(images.device):
        tokens = model(images)
    tokens = tokens.float()
    return tile_embedding(tokens, model.num_prefix) if mode == "cls+mean" else tokens[:, 0]


def embed_set(model, dataset, size: int, mean, std, mode: str = "cls+mean", batch_size: int = 64,
              device: str | torch.device = "cpu", progress: bool = True, desc: str = "embed"):
    """(features float32 [n, D], labels [n], skipped) of a LabelledSet; tiles that do not decode are skipped."""
    device = torch.device(device)
    feats, labels, skipped, buf, buf_y = [], [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc=desc, unit="tile", file=sys.stderr, leave=False)

    def flush():
        if buf:
            feats.append(embed_batch(model, normalise(np.stack(buf), mean, std, device), mode).cpu().numpy())
            labels.extend(buf_y)
            if bar is not None:
                bar.update(len(buf))
            buf.clear()
            buf_y.clear()

    for i in range(len(dataset)):
        try:
            buf.append(fit_tile(dataset.image(i), size))
            buf_y.append(int(dataset.labels[i]))
        except Exception as exc:  # noqa: BLE001 (any undecodable tile is skipped, counted and named)
            skipped.append(f"{dataset.paths[i] if dataset.paths else f'{dataset.source}[{i}]'}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            if bar is not None:
                bar.update(1)
        if len(buf) == batch_size:
            flush()
    flush()
    if bar is not None:
        bar.close()
    dim = feats[0].shape[1] if feats else 0
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), np.array(labels, np.int64), skipped
