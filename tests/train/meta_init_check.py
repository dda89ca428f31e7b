"""One rank of the meta-device init checks (run by test_meta_init.py, alone or under torchrun).

Builds student and teacher through train/networks.py with FSDP2 on (meta device -> shard ->
materialise -> init), then, on every rank: gathers each parameter (DTensor.full_tensor) and compares
it with a whole SSLNetwork built on this process with the same seed (and the same init_from file,
if given); reports the memory the build added (anonymous RSS, and the peak RSS). Writes one JSON file.
"""
import json
import resource
import sys

import torch


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    from virchow_fast.config import load_config
    from virchow_fast.train.distributed import init_distributed
    from virchow_fast.train.networks import build_networks

    config, out, compare = sys.argv[1], sys.argv[2], sys.argv[3] == "compare"
    cfg = load_config(config, sys.argv[4:])
    info = init_distributed(cfg)
    before, anon_before = _rss_mib(), _rss_mib("RssAnon")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    student, teacher = build_networks(cfg, info)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # RssAnon: the process's own memory; VmRSS also counts shared-library pages, which a warm page
    # cache maps in by the hundred MB (seen: +1 GB in a full test run), whatever the build holds
    result = {"rank": info.rank, "world": info.world_size, "rss_before_mib": before,
              "build_peak_mib": max(peak, peak_before) - before, "build_anon_mib": _rss_mib("RssAnon") - anon_before,
              "local_params": sum(
                  (p.to_local() if hasattr(p, "to_local") else p).numel() for p in student.parameters())}
    if compare:
        from virchow_fast.model.ssl import SSLNetwork

        whole = SSLNetwork(cfg.model, cfg.heads, seed=cfg.train.seed)
        if cfg.model.init_from:
            from virchow_fast.downstream.pretrained import init_student

            init_student(whole, cfg.model.init_from)
        mismatched = []
        for (name, want), s, t in zip(whole.named_parameters(), student.parameters(), teacher.parameters(),
                                      strict=True):
            for tag, got in (("student", s), ("teacher", t)):
                full = got.full_tensor() if hasattr(got, "full_tensor") else got
                if not torch.equal(full.detach().cpu(), want.detach().cpu()):
                    mismatched.append(f"{tag}.{name}")
        result["mismatched"] = mismatched
        result["checked"] = len(list(whole.parameters()))
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
