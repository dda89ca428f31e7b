"""eval.every during training: kNN accuracy and RankMe of the teacher in metrics.jsonl and TensorBoard,
equal to the same numbers computed afterwards from the checkpoint; a line per checkpoint written."""
import json

import numpy as np
import pytest
from conftest import tiny_config, write_image_folder

from virchow_fast.downstream.datasets import open_labelled
from virchow_fast.downstream.features import embed_set
from virchow_fast.downstream.probe import classification_metrics, knn_predict, rankme
from virchow_fast.downstream.weights import load_model


def expected_eval(run_dir, tiles, step: int, k: int = 5):
    """Leave-one-out kNN and RankMe of the checkpoint's teacher cls tokens, recomputed here."""
    model, w = load_model(run_dir, step)
    ds = open_labelled(tiles)
    x, y, _ = embed_set(model, ds, 42, w.mean, w.std, mode="cls", progress=False)
    pred, _ = knn_predict(x, y, None, len(ds.classes), k, leave_one_out=True)
    return classification_metrics(y, pred)["accuracy"], rankme(x)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("evaltiles"), 6)


def test_eval_every_logs_knn_and_rankme_of_the_teacher(tiles, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from virchow_fast.train.loop import run

    out = tmp_path / "run"
    run(tiny_config(f"train.output_dir={out}", "eval.every=1", f"eval.train={tiles}", "eval.k=5"))
    printed = capsys.readouterr().err  # the virchow_fast logger writes to stderr
    assert f"checkpoint written: {out / 'checkpoints' / 'step_00000001'}" in printed
    assert "eval step 2: kNN accuracy" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("eval_rankme" in r and "eval_knn_acc" in r for r in records)
    for r in records:
        acc, rank = expected_eval(out, tiles, r["step"] + 1)
        assert r["eval_knn_acc"] == pytest.approx(acc)
        assert r["eval_rankme"] == pytest.approx(rank, rel=1e-4)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/knn_acc", "eval/rankme", "train/loss", "train/dino", "train/lr", "train/tiles_per_s"} <= tags
    assert [e.value for e in events.Scalars("eval/rankme")] == pytest.approx([r["eval_rankme"] for r in records])


def test_eval_every_needs_a_set():
    from virchow_fast.config import ConfigError

    with pytest.raises(ConfigError, match="eval.train: eval.every > 0 needs a labelled tile set"):
        tiny_config("eval.every=5")


def test_balanced_subset_is_even_and_seeded(tiles):
    ds = open_labelled(tiles)
    sub = ds.balanced_subset(7, seed=3)
    assert len(sub) == 7 and sorted(np.bincount(sub.labels).tolist()) == [2, 2, 3]
    assert sub.paths == ds.balanced_subset(7, seed=3).paths


@pytest.mark.slow
def test_eval_every_under_two_process_fsdp(tiles, tmp_path):
    """Each rank embeds half the tiles through the sharded teacher; the gathered numbers are the full set's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from distrun import launch

    out = tmp_path / "run"
    res = launch(2, out, ["eval.every=2", f"eval.train={tiles}", "eval.k=5", "data.source=synthetic",
                          "model.num_registers=2"])
    assert "eval step 4: kNN accuracy" in res.stdout + res.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rankme" in r]
    assert [r["step"] for r in evals] == [1, 3]
    for r in evals:
        acc, rank = expected_eval(out, tiles, r["step"] + 1)
        assert r["eval_knn_acc"] == pytest.approx(acc)
        assert r["eval_rankme"] == pytest.approx(rank, rel=1e-4)
