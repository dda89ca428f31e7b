"""Batches staged on the device one step ahead: pinned host memory, a side stream, no waiting.

The loop takes step ``k``'s batch with :meth:`BatchStager.next` (already on the device) and, once
step ``k``'s kernels are queued, calls :meth:`BatchStager.prefetch`: it fetches step ``k + 1``'s
host batch, pins it and queues its copy on a copy stream, so the transfer runs under step ``k``'s
compute instead of after a synchronisation. A batch the loader made on the device (DALI on the
GPU) is taken as it is. :meth:`state_dict` is the data position of the batch ``next`` returns
next, so a checkpoint taken while a batch is staged resumes at that batch.
"""
from __future__ import annotations

import time

import torch

from ..data import Batch


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


class BatchStager:
    """``pin``: copy from pinned host memory (default: on CUDA devices)."""

    def __init__(self, loader, device: torch.device, pin: bool | None = None):
        self.loader, self.device = loader, torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.pin = self._cuda if pin is None else pin
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staged: tuple[dict, Batch, float] | None = None  # (loader state before it, batch, fetch seconds)
        self.fetch_s = 0.0  # host seconds the batch last returned by next() took to come from the loader
        self.prefetch_s = 0.0  # host seconds of the last prefetch (inside a step when the loop calls it there)

    def prefetch(self) -> None:
        """Fetch the next host batch and queue its copy (a no-op while one is staged)."""
        if self._staged is not None:
            return
        t0 = time.perf_counter()
        state = self.loader.state_dict()
        host = next(self.loader)
        fetched = time.perf_counter() - t0
        if self.pin:
            host = host.map(_pinned)
        if self._cuda:
            with torch.cuda.stream(self._stream):
                batch = host.to(self.device, non_blocking=True)
        else:
            batch = host.to(self.device, non_blocking=True)
        self._staged = (state, batch, fetched)
        self.prefetch_s = time.perf_counter() - t0

    def next(self) -> Batch:
        """The staged batch (fetched now when none is), usable on the current stream."""
        if self._staged is None:
            self.prefetch()
        _, batch, self.fetch_s = self._staged
        self._staged = None
        if self._cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)  # an event on the device: the host does not wait
            for t in batch.tensors():
                if t.device.type == "cuda":
                    t.record_stream(current)  # made on the copy stream, freed after the compute uses it
        return batch

    def state_dict(self) -> dict:
        return self._staged[0] if self._staged is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._staged = None
        self.loader.load_state_dict(state)
