"""Tiles/s of ``virchow-fast embed``: a generated slide end to end (read, tissue index, resize,
normalise, forward, HDF5) and the forward alone, per model size.

A pyramidal Aperio-style slide (0.25 um/px) is generated once into a cache folder; each model is a
randomly initialised backbone (same FLOPs as trained weights) saved as an export would be. On the
CPU the ops run their torch reference (no Triton interpreter involved), so the numbers are real
CPU throughput; on CUDA the forward runs in bf16.

    python benchmarks/bench_embed.py [--models debug,vit_s14] [--tile 224] [--batch 32] [--threads 2]
    python benchmarks/bench_embed.py --models vit_h14      # ViT-H/14 (Virchow 2's size): slow on a CPU
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, setup, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # ModelConfig overrides on configs/debug.yaml; img_size 224 everywhere
    "debug": [],
    "vit_s14": ["model.embed_dim=384", "model.depth=12", "model.num_heads=6", "model.mlp_hidden=1024"],
    "vit_h14": "configs/vit_h14_virchow2.yaml",
}


def _extra(p):
    p.add_argument("--models", default="debug,vit_s14", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tile", type=int, default=224, help="tile side at --mag (px)")
    p.add_argument("--mag", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=32, help="tiles per forward")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--size", default="6144x4608", help="generated slide WxH at 0.25 um/px")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "virchow_fast_bench"))


def _model_file(name: str, cache: Path) -> Path:
    import torch

    from virchow_fast.config import load_config
    from virchow_fast.downstream.export import write_model
    from virchow_fast.model.vit import VisionTransformer

    spec = MODELS[name]
    cfg = load_config(ROOT / spec) if isinstance(spec, str) else load_config(ROOT / "configs" / "debug.yaml", spec)
    path = cache / f"model_{name}" / "model.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        write_model(path, VisionTransformer(cfg.model).eval())
    return path


def main() -> None:
    args, device = setup("bench_embed", __doc__, _extra)
    import torch

    from virchow_fast.data.testslides import make_slide
    from virchow_fast.downstream.embed import embed
    from virchow_fast.downstream.features import embed_batch
    from virchow_fast.downstream.weights import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    slide = cache / f"embed_{w}x{h}.svs"
    if not slide.is_file():
        make_slide(slide, w, h, 0.25, "blobs", seed=7)
    rows = []
    for name in args.models.split(","):
        path = _model_file(name, cache)
        model, weights = load_model(path, device=str(dev))
        x = torch.randn(args.batch, 3, 224, 224, device=dev)
        embed_batch(model, x)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            embed_batch(model, x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        fwd = reps * args.batch / (time.perf_counter() - t0)
        out = cache / f"out_{name}"
        rep = embed([str(slide)], str(path), str(out), args.mag, args.tile, batch_size=args.batch,
                    device=str(dev), overwrite=True, progress=False, log=lambda line: None)
        rows.append({"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                     "device": dev.type, "threads": torch.get_num_threads(), "tiles": rep.tiles,
                     "end_to_end_tiles_s": rep.tiles / rep.seconds, "forward_tiles_s": fwd})
        print(f"  {name}: {rep.tiles} tiles in {rep.seconds:.1f} s end to end; forward alone {fwd:.1f} tiles/s",
              flush=True)
    print()
    print_table(rows)
    write_json("bench_embed", {"slide": f"{w}x{h} @ 0.25 um/px", "mag": args.mag, "tile": args.tile,
                               "batch": args.batch, "rows": rows}, args.out, device)


if __name__ == "__main__":
    main()
