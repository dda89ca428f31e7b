"""One training step waits on the host once: where the loop reads the step's statistics.

The run is ``virchow-fast train``'s own loop (configs/debug.yaml, synthetic tiles, fused AdamW as on
a GPU) on the CPU; one whole loop iteration (step 2, after a warm-up) is watched by a dispatch mode
that counts what would make the host wait for a CUDA stream:
- a scalar read of a device value (``.item()``, ``float()``, ``bool()``: aten._local_scalar_dense),
  ``tolist`` / ``numpy`` / ``cpu`` of a device tensor;
- ops whose output size depends on device values: nonzero, masked_select, unique, boolean-mask
  indexing, repeat_interleave without ``output_size``;
- host data going to the device without a pinned, non-blocking copy: ``torch.tensor(data,
  device=...)``, or a tensor made from host data (``torch.tensor``, ``from_numpy``: aten.lift_fresh)
  in the step, or a loader batch, that is either moved with ``.to(device)`` from unpinned memory /
  blocking, or used directly in an op with device tensors;
- ``torch.cuda.synchronize``.
On the CPU every tensor is "device" except those made from host data (and what is computed from
them alone: host work). The loader's own work is excluded (on a GPU machine it is host work in
its workers). Pinning cannot happen without a driver: the stager is made to pin (``pin=True``) and
``pin_memory`` is stood in for by a registry of "pinned" tensors.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from virchow_fast.config import load_config

aten = torch.ops.aten

_SIZE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                     aten.unique_dim.default, aten.unique_consecutive.default, aten.equal.default}


class SyncCounter(TorchDispatchMode):
    """Counts would-be stream synchronisations (see the module docstring) while ``active``."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.active = False
        self.paused = 0
        self.host = WeakTensorKeyDictionary()  # tensors holding host data
        self.pinned = WeakTensorKeyDictionary()

    def counting(self) -> bool:
        return self.active and not self.paused

    def note(self, what: str) -> None:
        if self.counting():
            self.events.append(what)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = [t for t in tensors if self.is_host(t)]
        all_host = bool(tensors) and len(on_host) == len(tensors)
        name = str(func.overloadpacket).replace("aten.", "")
        if func is aten.lift_fresh.default:
            out = func(*args, **kwargs)
            self.host[out] = True
            return out
        if not all_host:  # host work on host tensors never waits for the device
            if func is aten._local_scalar_dense.default:
                self.note("scalar read (item / float / bool)")
            elif func in _SIZE_FROM_VALUES:
                self.note(f"{name}: output size from device values")
            elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                self.note("repeat_interleave without output_size")
            elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.note(f"{name} with a boolean mask")
            if any(t.dim() > 0 for t in on_host):  # a 0-dim host tensor is read as a scalar: no copy
                self.note(f"host tensor used in device op {name} (blocking copy from pageable memory)")
        out = func(*args, **kwargs)
        if all_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
        return out


def _target_device(args, kwargs):
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


@pytest.fixture
def counter(monkeypatch):
    c = SyncCounter()
    orig_to, orig_pin, orig_is_pinned = torch.Tensor.to, torch.Tensor.pin_memory, torch.Tensor.is_pinned

    def to(self, *args, **kwargs):
        dev = _target_device(args, kwargs)
        if dev is not None and not c.paused:
            if c.is_host(self):
                non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args)
                if not (non_blocking and self in c.pinned):
                    c.note("host-to-device copy from unpinned memory or blocking")
                out = orig_to(self, *args, **kwargs)
                c.host.pop(out, None)  # it is on the device now
                return out
        # a device tensor's .to(device) is a no-op on a GPU; on the CPU .to("cpu") looks the same, so
        # device-to-host reads are caught as cpu / tolist / numpy / scalar reads only
        return orig_to(self, *args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        c.pinned[self] = True
        return self

    def read(kind):
        orig = getattr(torch.Tensor, kind)

        def fn(self, *args, **kwargs):
            if not c.is_host(self):
                c.note(f"device-to-host read ({kind})")
            return orig(self, *args, **kwargs)
        return fn

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self in c.pinned or orig_is_pinned(self))
    for kind in ("tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, kind, read(kind))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: c.note("torch.cuda.synchronize"))
    for make in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, make, made_on_device(getattr(torch, make), c))
    del orig_pin
    return c


def made_on_device(make, c):
    """torch.tensor(host data, device=...): a blocking copy from pageable memory on a GPU."""

    def fn(data, *args, **kwargs):
        out = make(data, *args, **kwargs)
        if kwargs.get("device") is not None and not c.paused:
            c.note(f"torch.{make.__name__}(host data, device=...) (blocking copy from pageable memory)")
            c.host.pop(out, None)
        return out
    return fn


class _PausedLoader:
    """The run's loader, its work not counted (on a GPU machine: host work in its workers)."""

    def __init__(self, loader, counter):
        self._loader, self._counter = loader, counter

    def __iter__(self):
        return self

    def __next__(self):
        with self._counter.pause():
            return next(self._loader)

    def state_dict(self):
        with self._counter.pause():
            return self._loader.state_dict()

    def load_state_dict(self, state):
        with self._counter.pause():
            return self._loader.load_state_dict(state)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _debug_config(out_dir, steps: int, extra=(), device: str = "cpu"):
    return load_config("configs/debug.yaml", [
        "data.source=synthetic", "data.num_workers=0", "optim.fused=on", f"train.device={device}", "train.threads=1",
        "train.epochs=1", f"train.steps_per_epoch={steps}", "train.checkpoint_every=1000",
        f"train.output_dir={out_dir}", *extra])


def count_step_syncs(counter, monkeypatch, out_dir, watched_step: int = 2, extra=()) -> list[str]:
    """Run the debug config for ``watched_step + 2`` steps (so the watched one stages the next batch);
    the events of iteration ``watched_step``."""
    from functools import partial

    from virchow_fast.train import loop
    from virchow_fast.train.metrics import MetricsWriter

    cfg = _debug_config(out_dir, watched_step + 2, extra)
    build_loader = loop.build_loader
    monkeypatch.setattr(loop, "build_loader", lambda *a, **k: _PausedLoader(build_loader(*a, **k), counter))
    if hasattr(loop, "BatchStager"):  # pin as on a GPU (the stand-in pin_memory above)
        monkeypatch.setattr(loop, "BatchStager", partial(loop.BatchStager, pin=True))
    write = MetricsWriter.write

    def watched_write(self, record):  # the watched iteration: from the write before it to its own
        counter.active = False
        with counter.pause():
            write(self, record)
        counter.active = record["step"] == watched_step - 1

    monkeypatch.setattr(MetricsWriter, "write", watched_write)
    with counter:
        loop.run(cfg)
    return counter.events


@pytest.mark.parametrize("extra", [
    (),
    pytest.param(("parallel.fsdp=on", "parallel.mixed_precision=bf16", "loss.centering=softmax"),
                 marks=pytest.mark.slow, id="fsdp-bf16-softmax"),  # FSDP2 on one rank
    pytest.param(("parallel.mixed_precision=bf16",), id="copies-bf16"),  # one GPU: bf16 compute copies, no FSDP
])
def test_one_training_step_synchronises_once(counter, monkeypatch, tmp_path, extra):
    events = count_step_syncs(counter, monkeypatch, tmp_path / "run", extra=extra)
    assert events == ["device-to-host read (tolist)"], events


@pytest.mark.gpu
def test_one_training_step_synchronises_once_on_the_gpu(monkeypatch, tmp_path):
    """The same on a GPU, counted by CUDA's own sync debug mode (a warning per synchronising call)."""
    import warnings

    from virchow_fast.train import loop
    from virchow_fast.train.metrics import MetricsWriter

    cfg = _debug_config(tmp_path / "run", 4, device="cuda")
    write, caught = MetricsWriter.write, []

    def watched_write(self, record):  # iteration 2: from the write of step 1 to its own
        torch.cuda.set_sync_debug_mode(0)
        write(self, record)
        if record["step"] == 1:
            torch.cuda.synchronize()  # start from an idle device, outside the watched span
            torch.cuda.set_sync_debug_mode(1)

    monkeypatch.setattr(MetricsWriter, "write", watched_write)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.run(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_counter_sees_each_kind_of_sync(counter):
    """The counter is not blind: each kind it looks for, done on purpose, is counted once."""
    import numpy as np

    dev = torch.randn(6)
    counter.active = True
    with counter:
        float(dev.sum())
        dev[dev > 0].sum()
        torch.nonzero(dev)
        torch.repeat_interleave(torch.arange(3), torch.full((3,), 2))
        host = torch.from_numpy(np.arange(6, dtype=np.float32))
        host.sum().item()  # host work: not counted
        dev + host  # a pageable host tensor in a device op
        dev.tolist()
        torch.tensor([1.0, 2.0]).to(dev.device)  # unpinned
        pinned = torch.tensor([1.0, 2.0]).pin_memory()
        pinned.to(dev.device, non_blocking=True)  # pinned, non-blocking: not counted
        torch.cuda.synchronize()
        torch.tensor(1.0, device=dev.device)
    assert len(counter.events) == 9, counter.events
    assert counter.events[1] == "index with a boolean mask"
