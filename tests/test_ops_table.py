"""The op table (ops/table.py) is the one list of ops: dispatch, config, env names and validation read it."""
import importlib

import pytest

from virchow_fast import ops
from virchow_fast.config import ConfigError, OpsConfig, describe, load_config
from virchow_fast.ops import dispatch
from virchow_fast.ops.table import BACKENDS, TABLE


def test_each_op_is_named_after_its_function_and_its_implementations_exist():
    for name, op in TABLE.items():
        assert callable(getattr(ops, name)), name
        for backend in op.backends():
            module, fn = getattr(op, backend).split(":")
            assert fn == name, (name, backend)  # the function's name is the op's name, everywhere
            if backend != "cuda":  # the extension is only built on GPU machines (tests/kernels/test_cuda_ext.py)
                assert callable(getattr(importlib.import_module(module), fn)), (name, backend)
        assert op.auto[-1] == "torch" and set(op.auto) <= set(op.backends()), name
        assert op.evidence, f"{name}: the auto order needs its evidence"


def test_config_fields_and_docs_come_from_the_table():
    assert [f for f in vars(OpsConfig())] == list(TABLE)
    lines = [line for line in describe() if line.startswith("ops.")]
    assert len(lines) == len(TABLE)
    for name, op in TABLE.items():
        (line,) = [x for x in lines if x.startswith(f"ops.{name} ")]
        assert f"auto | {' | '.join(op.backends())}" in line


@pytest.mark.parametrize("override, message", [
    ("ops.swiglu=cuda", "ops.swiglu: 'cuda' is not one of auto, torch, triton"),
    ("ops.attention=fast", "ops.attention: 'fast' is not one of auto, torch, triton"),
    ("ops.head_loss=torch", "ops.head_loss: renamed ops.prototype_loss"),
    ("ops.centering=cuda", "ops.centering: renamed ops.teacher_probs"),
])
def test_bad_backend_choices_fail_at_config_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert str(err.value) == f"debug: {message}"


def test_environment_names_and_choices_are_checked(monkeypatch):
    monkeypatch.setenv("VIRCHOW_FAST_SWIGLU", "cuda")
    with pytest.raises(ValueError, match="VIRCHOW_FAST_SWIGLU: 'cuda' is not a backend of swiglu"):
        ops.backend_for("swiglu", "cpu")
    monkeypatch.setenv("VIRCHOW_FAST_SWIGLU", "torch")
    assert ops.backend_for("swiglu", "cpu") == "torch"


def test_auto_takes_the_first_available_backend_of_the_table_on_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_configured", {})
    for name, op in TABLE.items():
        monkeypatch.delenv(op.env, raising=False)
        for missing in op.auto:  # drop one backend at a time: the next in the order takes over
            monkeypatch.setattr(dispatch, "_available", lambda o, b, d, m=missing: b != m or b == "torch")
            want = next(b for b in op.auto if b != missing or b == "torch")
            assert ops.backend_for(name, "cuda") == want, (name, missing)
        assert ops.backend_for(name, "cpu") == "torch"
    assert set(BACKENDS) == {"torch", "triton", "cuda"}
