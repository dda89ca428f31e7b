"""The package's logging setup: one stderr handler, installed once, that follows sys.stderr."""
import io
import logging
import logging.handlers
import sys

import pytest

from virchow_fast.logs import StderrHandler, ensure_logging


@pytest.fixture
def bare(monkeypatch):
    """The ``virchow_fast`` logger as a fresh process has it (no handler, no level), restored after."""
    root = logging.getLogger("virchow_fast")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "propagate", True)
    level = root.level
    root.setLevel(logging.NOTSET)
    yield root
    root.setLevel(level)


def test_installs_one_handler_that_writes_to_the_current_stderr(bare, monkeypatch):
    ensure_logging()
    ensure_logging()
    assert len(bare.handlers) == 1 and isinstance(bare.handlers[0], StderrHandler)
    assert bare.level == logging.INFO and not bare.propagate
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)  # as pytest's capture or a notebook does after the handler exists
    logging.getLogger("virchow_fast.train").info("checkpoint written: %s", "x/step_00000002")
    logging.getLogger("virchow_fast.train").debug("not at info")
    err = later.getvalue()
    assert err.endswith(" INFO virchow_fast.train: checkpoint written: x/step_00000002\n") and "not at" not in err


def test_a_given_level_applies_and_someone_elses_setup_is_kept(bare, capsys):
    ensure_logging("warning")
    logging.getLogger("virchow_fast.data").info("data: indexed 3 slides")
    logging.getLogger("virchow_fast.data").warning("data: skipped tile: a.svs")
    err = capsys.readouterr().err
    assert "data: skipped tile: a.svs" in err and "indexed" not in err
    mine = logging.handlers.BufferingHandler(10)
    bare.handlers[:] = [mine]
    ensure_logging()  # an entry point run in-process: the application's handler and level stay
    assert bare.handlers == [mine] and bare.level == logging.WARNING
