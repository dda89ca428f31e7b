"""The step's memory on one GPU, and the cheapest activation-checkpointing policy that fits a device.

Estimate per rank (FSDP over N ranks; one GPU is N = 1):

- student master weights fp32, their gradients fp32 and AdamW's two moments fp32: 4 + 4 + 8 bytes
  per trainable parameter / N; the teacher's fp32 weights / N;
- under FSDP, the compute copies it gathers (bf16 under bf16): the root's parameters (embeddings,
  heads: gathered from the forward to the backward) plus two of the largest blocks (the one running
  and the one prefetched), the whole student on one GPU; one GPU without FSDP under bf16 keeps
  persistent bf16 copies of the student and the teacher (train/copies.py) and its gradients are
  bf16 (2 bytes, on the copies); otherwise the parameters are used as they are;
- the activations: the bytes autograd saves in the forward, counted in the trace (unique storages,
  parameters excluded); they depend on the checkpointing policy;
- a transient workspace: twice the largest single op's inputs and outputs (a backward's inputs,
  outputs and the block recomputed under checkpointing).
"""
from __future__ import annotations

from ..config import Config
from .trace import StepTrace

# cheapest first: no recompute; recompute the elementwise ops only; recompute every block
POLICIES = ("off", "selective", "full")


def memory_estimate(trace: StepTrace) -> dict:
    """Bytes per rank of the traced step, by part (and ``total``)."""
    n = trace.world_size
    counts = trace.param_counts
    largest = max((r.bytes for r in trace.records if r.phase in ("forward", "backward") and r.kind != "comm"),
                  default=0.0)
    root = counts.get("root", 0)
    # one GPU keeps the student's blocks gathered (nothing to free by resharding), else two at a time
    gathered = counts["student"] if n == 1 else root + 2 * counts["largest_unit"]
    parts = {
        "weights": 4.0 * counts["student"] / n,
        "gradients": (2.0 if trace.copies else 4.0) * counts["trainable"] / n,
        "optimizer": 8.0 * counts["trainable"] / n,
        "teacher": 4.0 * counts["teacher"] / n,
        "compute_copies": (2.0 if trace.bf16 else 4.0) * gathered if trace.fsdp else
        2.0 * (counts["student"] + counts["teacher"]) if trace.copies else 0.0,
        "activations": float(trace.activation_bytes),
        "workspace": 2.0 * largest,
    }
    parts["total"] = sum(parts.values())
    return parts


def choose_policy(cfg: Config, tiles: int, world_size: int, device_bytes: float, margin: float = 0.1,
                  trace_fn=None) -> tuple[str, dict]:
    """The first policy of :data:`POLICIES` whose estimate fits ``(1 - margin) * device_bytes``.

    Returns (policy, {policy: estimated total bytes}); ``full`` when none fits (the smallest).
    ``trace_fn(cfg, tiles, ac, world_size)`` defaults to a forward-only trace.
    """
    from .trace import trace_step

    trace_fn = trace_fn or (lambda c, t, a, w: trace_step(c, t, a, w, forward_only=True))
    estimates = {}
    for policy in POLICIES:
        estimates[policy] = memory_estimate(trace_fn(cfg, tiles, policy, world_size))["total"]
        if estimates[policy] <= (1.0 - margin) * device_bytes:
            return policy, estimates
    return "full", estimates
