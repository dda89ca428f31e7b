"""Predicted cost of one training step on an H200, counted on the CPU in seconds (no GPU needed).

One training step of the config (teacher and student forward, losses, backward, clipping, AdamW,
EMA) is traced on tensors that hold no data, with the kernels, precision, FSDP and checkpointing
a CUDA run uses (virchow_fast/perf/trace.py). Every op's FLOPs and bytes are priced on one H200
(virchow_fast/perf/cost.py: GEMMs at 80 % of 790 TFLOP/s, our attention and head-loss kernels at
50 % of 790 on the FLOPs they issue, memory-bound ops at 80 % of 4.3 TB/s) and summed per
category. These are predictions, not measurements. When benchmarks/results/ holds a
bench_profile.py result of the same model, batch and AC mode, its measured times are printed
beside the prediction.

    python benchmarks/cost_model.py --config configs/vit_h14_virchow2.yaml --tiles 32
    python benchmarks/cost_model.py --config configs/vit_g14_virchow2g.yaml --ac selective
    python benchmarks/cost_model.py --config configs/vit_h14_virchow2.yaml --collectives   # + 8/64/512 GPUs

Writes a JSON (``--json``); the last line reads ``predicted: <tiles/s> tiles/s, MFU <x> %``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/vit_h14_virchow2.yaml"), help="config YAML")
    p.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
    p.add_argument("--tiles", type=int, default=None, help="tiles per GPU (default: the config's data.batch_size)")
    p.add_argument("--ac", default=None, help="activation checkpointing: off | selective | full | every_k | auto "
                                               "(default: the config's)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs the step is sharded over (FSDP)")
    p.add_argument("--collectives", action="store_true", help="also price FSDP's traffic on 8, 64 and 512 GPUs")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/cost_model_<...>.json)")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"),
                   help="folder with measured bench_profile JSON")
    args = p.parse_args(argv)

    import logging
    import warnings

    # the trace is noisy (fake tensors, meta devices): quiet while it runs, and restore what the
    # caller had (tests and notebooks call main() in their own process)
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        try:
            return _run(args)
        finally:
            logging.disable(previous)


def _run(args) -> int:
    from virchow_fast.config import ConfigError, load_config
    from virchow_fast.perf.cost import H200, collective_times, measured_profiles, summarize
    from virchow_fast.perf.memory import choose_policy, memory_estimate
    from virchow_fast.perf.trace import trace_step

    t0 = time.perf_counter()
    try:
        sets = ["data.source=synthetic", "data.paths=[]", *args.set]  # flags go through the config's validation
        sets += [f"data.batch_size={args.tiles}"] if args.tiles is not None else []
        sets += [f"parallel.activation_checkpointing={args.ac}"] if args.ac else []
        cfg = load_config(args.config, sets)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"cost_model: {exc}", file=sys.stderr)
        return 2
    tiles, ac = cfg.data.batch_size, cfg.parallel.activation_checkpointing
    estimates = None
    if ac == "auto":
        ac, estimates = choose_policy(cfg, tiles, args.world_size, H200.memory_bytes)
        print(f"auto activation checkpointing -> {ac} (estimated GB per policy: "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in estimates.items()) + ")")
    trace = trace_step(cfg, tiles, ac, args.world_size)
    s = summarize(trace, cfg)
    s["memory"] = memory_estimate(trace)
    total = s["step_seconds"]

    print(f"{cfg.name}: {tiles} tiles/GPU, {args.world_size} GPU(s), activation checkpointing {ac}, "
          f"{cfg.parallel.mixed_precision}; predicted on one H200 (estimates, not measurements)")
    measured = measured_profiles(Path(args.results), cfg, tiles, (ac, cfg.parallel.activation_checkpointing))
    meas = {r["category"]: r["ms"] for r in measured[-1]["rows"]} if measured else {}
    head = f"{'category':32s} {'ops':>6s} {'TFLOP':>8s} {'issued':>8s} {'GB':>8s} {'ms':>8s} {'%step':>6s}"
    print(head)
    for name, row in s["categories"].items():
        print(f"{name:32s} {row['ops']:6d} {row['flops'] / 1e12:8.2f} {row['issued_flops'] / 1e12:8.2f} "
              f"{row['bytes'] / 1e9:8.2f} {row['seconds'] * 1e3:8.2f} {100 * row['seconds'] / total:6.1f}")
    print(f"{'step':32s} {'':6s} {sum(r['flops'] for r in s['categories'].values()) / 1e12:8.2f} "
          f"{sum(r['issued_flops'] for r in s['categories'].values()) / 1e12:8.2f} "
          f"{sum(r['bytes'] for r in s['categories'].values()) / 1e9:8.2f} {total * 1e3:8.2f}")
    print(f"memory-bound ops: {s['memory_bound_seconds'] * 1e3:.2f} ms ({100 * s['memory_bound_share']:.1f} % of "
          f"the step); collectives {s['collective_bytes'] / 1e9:.2f} GB (not in the step time)")
    mem = s["memory"]
    print("memory estimate per GPU (GB): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in mem.items()))
    if measured:
        print(f"\nmeasured ({measured[-1]['path']}) vs predicted, by bench_profile category (ms):")
        for cat in sorted(set(meas) | set(s["by_profile_category"])):
            pred = s["by_profile_category"].get(cat, 0.0) * 1e3
            print(f"  {cat:28s} measured {meas.get(cat, 0.0):8.2f}   predicted {pred:8.2f}")
        s["measured"] = {"path": measured[-1]["path"], "ms": meas, "step_ms": measured[-1].get("step_ms")}
    else:
        print("(no GPU profile of this model, batch and AC mode under benchmarks/results/: predictions only)")
    if args.collectives:
        ctrace = trace_step(cfg, tiles, ac, 8) if args.world_size == 1 else trace
        rows = collective_times(ctrace)
        s["collectives"] = rows
        payload = sum(r.bytes for r in ctrace.records if r.kind == "comm")
        print(f"\nFSDP traffic per GPU per step (payload {payload / 1e9:.2f} GB traced at 8 GPUs) vs predicted "
              f"compute {total * 1e3:.1f} ms:")
        for r in rows:
            print(f"  {r['gpus']:4d} GPUs over {r['network']:10s}: {r['bytes_per_gpu'] / 1e9:6.2f} GB, "
                  f"{r['seconds'] * 1e3:7.1f} ms ({'hidden' if r['seconds'] < total else 'NOT hidden'} behind compute)")
    if estimates:
        s["auto_estimates"] = estimates
    out = Path(args.json or ROOT / f"benchmarks/results/cost_model_{cfg.name}_b{tiles}_{ac}_w{args.world_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(s, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    print(f"predicted: {s['tiles_per_s']:.1f} tiles/s, MFU {100 * s['mfu']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
