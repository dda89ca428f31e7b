"""FSDP2 over 2 gloo processes == 1 process, per step; activation checkpointing changes nothing.

Each comparison uses the same global batch (1 process x 8 tiles, or 2 x 4: the loader gives the
same tiles and, through data.masks.step_masks, the same iBOT masks). Per-rank DINO / iBOT
losses are means over equal numbers of tiles and images, so their mean over ranks (what the loop
logs) is the 1-process loss; the KDE regulariser is per rank by design and is kept out of the
loss here (weight 0, still computed). Tolerances:
- fp32: 1e-5 relative (only the order of the gradient reduction differs);
- bf16: 5e-3 relative against the fp32 run (bf16 rounds to 2^-8 = 3.9e-3; we see <= 1e-3 over
  4 steps); the same for the 1-process autocast path.
Launches take ~10-20 s each on 2 CPU cores (most of it is start-up).
"""
import pytest
import torch
from distrun import assert_losses_close, cached, metrics

pytestmark = pytest.mark.slow

FP32_REL = 1e-5
BF16_REL = 5e-3


def test_fsdp_two_processes_equal_one_process_fp32():
    one, two = metrics(cached(1)), metrics(cached(2))
    assert len(one) == 4
    assert_losses_close(two, one, FP32_REL, keys=("loss", "dino", "ibot", "grad_norm"))
    assert one[-1]["loss"] != one[0]["loss"]  # the runs train


def test_activation_checkpointing_identical_under_fsdp():
    off = metrics(cached(2))
    full = metrics(cached(2, ("parallel.activation_checkpointing=full",)))
    assert_losses_close(full, off, 0.0, keys=("loss", "dino", "ibot", "grad_norm"))


def test_checkpointed_blocks_per_mode():
    from virchow_fast.config import ParallelConfig
    from virchow_fast.train.parallelize import checkpointed_blocks

    assert checkpointed_blocks(ParallelConfig(activation_checkpointing="off"), 6) == []
    assert checkpointed_blocks(ParallelConfig(activation_checkpointing="full"), 3) == [0, 1, 2]
    assert checkpointed_blocks(ParallelConfig(activation_checkpointing="every_k", ac_every=2), 5) == [0, 2, 4]


def test_fsdp_bf16_mixed_precision_close_to_fp32():
    ref = metrics(cached(1))
    bf16 = metrics(cached(2, ("parallel.mixed_precision=bf16",)))
    worst = assert_losses_close(bf16, ref, BF16_REL)
    assert worst > 0.0  # bf16 really ran


def test_single_process_bf16_compute_copies_close_to_fp32():
    ref = metrics(cached(1))
    bf16 = metrics(cached(1, ("parallel.mixed_precision=bf16",)))
    worst = assert_losses_close(bf16, ref, BF16_REL)
    assert worst > 0.0


def test_single_process_bf16_compute_copies_equal_one_rank_fsdp():
    """One GPU's default (bf16 compute copies, no FSDP, train/copies.py) is a one-rank FSDP2 run
    without its copies: the same losses and the same saved student and teacher, bit for bit."""
    import warnings

    copies = cached(1, ("parallel.mixed_precision=bf16",))
    fsdp = cached(1, ("parallel.mixed_precision=bf16", "parallel.fsdp=on"))
    keys = ("step", "loss", "dino", "ibot", "reg", "grad_norm")
    terms = lambda run: [{k: r[k] for k in keys if k in r} for r in metrics(run)]  # noqa: E731
    assert terms(copies) == terms(fsdp) and len(terms(copies)) >= 4 and "grad_norm" in terms(copies)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = _saved_networks(copies), _saved_networks(fsdp)
    for net in ("student", "teacher"):
        assert not torch.equal(got[net]["backbone.pos_embed"], got["initial"]["backbone.pos_embed"])  # trained
        for k, v in want[net].items():
            assert torch.equal(got[net][k], v), f"{net}.{k}"


def _saved_networks(run_dir, step: int = 4) -> dict:
    import torch.distributed.checkpoint as dcp
    from distrun import TINY

    from virchow_fast.config import load_config
    from virchow_fast.model.ssl import SSLNetwork

    cfg = load_config("configs/debug.yaml", TINY)
    torch.manual_seed(cfg.train.seed)  # the runs' initial weights
    initial = {k: v.clone() for k, v in SSLNetwork(cfg.model, cfg.heads).state_dict().items()}
    state = {name: {k: v.clone() for k, v in initial.items()} for name in ("student", "teacher")}
    dcp.load(state, checkpoint_id=str(run_dir / "checkpoints" / f"step_{step:08d}"))
    return {**state, "initial": initial}


def test_fsdp_weights_and_sharded_teacher_ema_equal_one_process():
    """The saved student and teacher (EMA of the local shards) match the 1-process run's weights."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one, two = _saved_networks(cached(1)), _saved_networks(cached(2))
    for name in ("student", "teacher"):
        for key, want in one[name].items():
            assert (two[name][key] - want).abs().max() <= 1e-6 * (1 + want.abs().max()), (name, key)
    # the EMA moved the teacher, in the root's parameters and in the blocks' (separate FSDP groups)
    for key in ("backbone.pos_embed", "dino_head.prototypes", "backbone.blocks.1.mlp.fc1.weight"):
        assert (two["teacher"][key] - two["initial"][key]).abs().max() > 1e-7, key


def test_single_process_bf16_compute_copies_resume_equals_uninterrupted(tmp_path):
    """Resuming a one-GPU bf16 run loads the fp32 masters in place; the copies are recast from them
    before the next forward (train/copies.py), so steps 3-4 equal the uninterrupted run's exactly."""
    import shutil

    from distrun import launch

    extra = ("parallel.mixed_precision=bf16",)
    full = cached(1, extra)  # 4 steps, checkpoints at 2 and 4
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if killed after step 2's checkpoint
    res = launch(1, out, list(extra), resume=True)
    assert "resumed from" in res.stdout + res.stderr
    keys = ("step", "loss", "dino", "ibot", "reg", "grad_norm")
    terms = lambda run: [{k: r[k] for k in keys if k in r} for r in metrics(run)]  # noqa: E731
    assert terms(out)[2:] == terms(full)[2:] and len(terms(out)) == len(terms(full))
