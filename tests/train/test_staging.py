"""BatchStager: one batch ahead, and a data position that never skips the staged batch."""
import torch

from virchow_fast.data import Batch
from virchow_fast.train.staging import BatchStager


class _Steps:
    """A loader of tiny batches whose state is the next step."""

    def __init__(self, start: int = 0):
        self.next_step = start

    def __next__(self) -> Batch:
        step, self.next_step = self.next_step, self.next_step + 1
        masks = torch.zeros(2, 4, dtype=torch.bool)
        masks[0, step % 4] = True
        return Batch(torch.full((2, 3, 2, 2), float(step)), torch.zeros(0, 3, 1, 1), masks, torch.ones(1), step)

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = state["next_step"]


def test_staged_batch_is_the_data_position():
    stager = BatchStager(_Steps(), torch.device("cpu"))
    assert stager.next().step == 0
    stager.prefetch()  # step 1 staged: a checkpoint now must resume at step 1, not 2
    assert stager.state_dict() == {"next_step": 1}
    stager.prefetch()  # already staged: no second fetch
    assert stager.loader.next_step == 2
    batch = stager.next()
    assert batch.step == 1 and stager.state_dict() == {"next_step": 2}
    assert torch.equal(batch.mask_indices, torch.tensor([1])) and batch.mask_weights.tolist() == [0.5]


def test_loading_a_position_drops_the_staged_batch():
    stager = BatchStager(_Steps(), torch.device("cpu"))
    stager.prefetch()
    stager.load_state_dict({"next_step": 7})
    assert stager.next().step == 7


def test_pinned_copy_when_asked(monkeypatch):
    """With ``pin`` every host tensor is pinned before its non-blocking copy (a stand-in pin here)."""
    pinned, copies = set(), []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.add(id(self)) or self)
    to = torch.Tensor.to

    def record(self, *args, **kwargs):
        copies.append((id(self) in pinned, kwargs.get("non_blocking", False)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", record)
    BatchStager(_Steps(), torch.device("cpu"), pin=True).next()
    assert len(copies) == 6 and all(p and nb for p, nb in copies), copies
