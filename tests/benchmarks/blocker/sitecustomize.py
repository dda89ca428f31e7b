"""Import blocker for the simulated H200 environment (on PYTHONPATH, loaded at interpreter start).

The lent H200 machine has no DALI, cuCIM, OpenSlide or imagecodecs. Here they may be installed, so
every import of them fails as it would there (ModuleNotFoundError, message says why), and every
attempt is appended to the file named by VF_BLOCK_IMPORTS_LOG (one line: module and the importing
file), so a test can assert that nothing on gpu_check's path even tries.
"""
import importlib.abc
import os
import sys

BLOCKED = ("nvidia.dali", "cucim", "openslide", "imagecodecs")


def _blocked(name: str) -> bool:
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if not _blocked(name):
            return None
        log = os.environ.get("VF_BLOCK_IMPORTS_LOG")
        if log:
            frame, where = sys._getframe(1), "?"
            while frame is not None:  # the first frame outside the import machinery
                if not frame.f_code.co_filename.startswith("<frozen"):
                    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                    break
                frame = frame.f_back
            with open(log, "a") as f:
                f.write(f"{name} from {where}\n")
        raise ModuleNotFoundError(f"No module named '{name}' (blocked: simulated H200 environment)", name=name)


sys.meta_path.insert(0, _Blocker())
for _mod in [m for m in sys.modules if _blocked(m)]:
    del sys.modules[_mod]

# Another sitecustomize later on sys.path (a venv's own) still runs.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _cand = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_cand):
        exec(compile(open(_cand).read(), _cand, "exec"), {"__name__": "sitecustomize", "__file__": _cand})
        break
