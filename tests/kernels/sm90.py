"""Compile-only launches for sm_90a (H100 / H200) on a machine without a GPU.

``compile_launch(fn, *args, **kwargs)`` calls ``fn`` (a kernel's real launcher, or anything that
ends in Triton launches) with a stand-in Triton driver that reports an sm_90a device: every
``kernel[grid](...)`` inside is specialised exactly as on a GPU (which int arguments and strides
are divisible by 16, which pointers are 16-byte aligned), compiled through Triton's real pipeline
(TTGIR, PTX, ptxas to a cubin) and recorded instead of launched. Each launch comes back as a
:class:`CompiledInfo` read from the artefacts:

- ``dots``: every ``tl.dot`` (M, N, K, kind) from the TTGIR; kind is "wgmma"
  (``ttng.warp_group_dot``), "mma.sync" (an ``nvidia_mma`` v2 dot) or "fma" (no tensor cores);
- ``regs``, ``stack``: registers per thread and stack frame bytes (cuobjdump -res-usage);
  ``spills``: local-memory instructions (STL / LDL) in the SASS (cuobjdump -sass);
- ``smem``: shared memory bytes per CTA (Triton's metadata);
- ``accesses``: global loads and stores by source line, with their widths in bits, from the PTX
  (``ld.global`` / ``st.global`` / ``cp.async``, mapped to kernel source lines by ``.loc``), and
  ``bulk``: those of tiles large enough for every thread to move 128 bits at a time (a tile of
  at least num_warps * 32 * 128 bits, from the TTGIR types), the accesses that must be 128-bit;
- ``grid``, ``num_warps``, ``num_stages``, ``constexprs``: the launch configuration;
- ``ctas_per_sm``: an estimate of resident CTAs per SM from registers, shared memory and threads.

Launchers that time candidates with ``triton.testing.do_bench`` get a stand-in that compiles each
candidate once and reports equal times (so every candidate is recorded and the default is kept).
SM counts come from ``virchow_fast.kernels._common.sm_count``, patched to an H200's 132.

Triton's ``@jit`` decorators must not be interpreter objects here: call this in a process without
``TRITON_INTERPRET=1`` (``run_in_subprocess`` does that for a test session that interprets).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

SMEM_LIMIT = 227 * 1024  # sm_90: most shared memory one CTA may use
H200_SMS = 132
_SM_REGS, _SM_SMEM, _SM_THREADS, _SM_CTAS = 65536, 228 * 1024, 2048, 32
_REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Access:
    """Global memory accesses of one kernel source line: direction, widths (bits) -> count."""
    line: int
    kind: str  # "load" | "store"
    widths: dict[int, int]
    tile_bits: int  # largest tile (elements x element bits) the TTGIR accesses on this line; 0 = scalar
    bulk: bool


@dataclasses.dataclass
class CompiledInfo:
    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    constexprs: dict
    dots: list[tuple[int, int, int, str]]
    regs: int
    stack: int
    spills: int
    smem: int
    accesses: list[Access]
    ctas_per_sm: int
    ttgir: str = dataclasses.field(repr=False, default="")
    ptx: str = dataclasses.field(repr=False, default="")
    sass: str = dataclasses.field(repr=False, default="")

    @property
    def mma(self) -> str:
        """The MMA kinds of the kernel's dots ("wgmma", "mma.sync", "fma", joined by "+"), or "-"."""
        kinds = sorted({d[3] for d in self.dots})
        return "+".join(kinds) if kinds else "-"

    def widths(self, kind: str, bulk_only: bool = True) -> dict[int, int]:
        out: dict[int, int] = {}
        for a in self.accesses:
            if a.kind == kind and (a.bulk or not bulk_only):
                for w, n in a.widths.items():
                    out[w] = out.get(w, 0) + n
        return out

    def min_bulk_width(self, kind: str) -> int | None:
        """Narrowest access (bits) among the bulk loads or stores; None when there are none."""
        w = self.widths(kind)
        return min(w) if w else None

    def describe(self) -> str:
        c = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{self.kernel} grid={self.grid} warps={self.num_warps} stages={self.num_stages} {c}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("ttgir", "ptx", "sass"):
            d.pop(k)
        return d

    @staticmethod
    def from_json(d: dict) -> "CompiledInfo":
        d = dict(d, grid=tuple(d["grid"]), dots=[tuple(x) for x in d["dots"]],
                 accesses=[Access(**dict(a, widths={int(k): v for k, v in a["widths"].items()}))
                           for a in d["accesses"]])
        return CompiledInfo(**d)


# ---------------------------------------------------------------------------------------------
# artefact parsing
# ---------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16, "b32": 32, "u32": 32,
         "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64, "b128": 128}
_ELEM_BITS = {"i1": 8, "i8": 8, "i16": 16, "f16": 16, "bf16": 16, "i32": 32, "f32": 32, "i64": 64, "f64": 64}


def _ptx_accesses(ptx: str) -> dict[tuple[int, str], dict[int, int]]:
    """(source line, "load"/"store") -> {width bits: count} of global accesses in PTX."""
    files = {m.group(1): m.group(2) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    out: dict[tuple[int, str], dict[int, int]] = {}
    line = 0
    for text in ptx.splitlines():
        s = text.strip()
        m = re.match(r"\.loc\s+(\d+)\s+(\d+)\s+\d+", s)
        if m:
            line = int(m.group(2)) if not files.get(m.group(1), "").endswith(("core.py", "standard.py")) else line
            continue
        s = re.sub(r"^@!?%p\d+\s+", "", s)
        m = re.match(r"(ld|st)\.global((?:\.[\w:]+)*)\s", s)
        if m:
            parts = m.group(2).split(".")
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
            bits = vec * next((_BITS[p] for p in parts if p in _BITS), 32)
            key = (line, "load" if m.group(1) == "ld" else "store")
        elif s.startswith("cp.async.bulk"):
            bits, key = 1024, (line, "load")  # TMA: a whole box per instruction
        elif s.startswith(("cp.async.ca.", "cp.async.cg.")):
            m = re.search(r"\],\s*(0x[0-9a-f]+|\d+)", s)
            bits, key = 8 * int(m.group(1), 0), (line, "load")
        else:
            continue
        d = out.setdefault(key, {})
        d[bits] = d.get(bits, 0) + 1
    return out


def _ttgir_locs(ttgir: str) -> dict[str, int]:
    """#locN -> source line (named and call-site locations resolved to the innermost file line)."""
    defs = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ttgir, re.M))

    @lru_cache(maxsize=None)
    def resolve(name: str) -> int:
        body = defs.get(name, "")
        m = re.match(r'"[^"]*":(\d+):\d+', body)
        if m:
            return int(m.group(1))
        m = re.match(r"callsite\((#loc\d*)", body) or re.search(r"\((#loc\d*)\)", body)
        return resolve(m.group(1)) if m else 0

    return {k: resolve(k) for k in defs}


def _ttgir_tiles(ttgir: str) -> dict[tuple[int, str], int]:
    """(source line, "load"/"store") -> largest tile bits a global access op moves on that line."""
    locs = _ttgir_locs(ttgir)
    out: dict[tuple[int, str], int] = {}
    for text in ttgir.splitlines():
        m = re.search(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local"
                      r"|tt\.descriptor_load|tt\.descriptor_store)\b", text)
        if not m:
            continue
        loc = re.search(r"loc\((#loc\d*)\)\s*$", text)
        line = locs.get(loc.group(1), 0) if loc else 0
        kind = "store" if "store" in m.group(1) else "load"
        t = re.search(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>", text) or re.search(r"tensor<([\dx]+)x(\w+)[,>]", text)
        bits = 0
        if t:
            n = 1
            for d in t.group(1).split("x"):
                n *= int(d)
            bits = n * _ELEM_BITS.get(t.group(2), 32)
        out[(line, kind)] = max(out.get((line, kind), 0), bits)
    return out


def _ttgir_dots(ttgir: str) -> list[tuple[int, int, int, str]]:
    encodings = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<\{[^\n]*)$", ttgir, re.M))
    dots = []
    for text in ttgir.splitlines():
        m = re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", text)
        if not m:
            continue
        shapes = re.findall(r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x\w+(?:, (#\w+))?", text.split(" : ", 1)[1])
        (m_, k_, _), (_, n_, enc) = shapes[0], shapes[-1]
        if m.group(1) == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            e = encodings.get(enc, "")
            kind = "mma.sync" if "nvidia_mma" in e or "mma" in enc and "blocked" not in e else "fma"
        dots.append((int(m_), int(n_), int(k_), kind))
    return dots


def _ctas_per_sm(regs: int, threads: int, smem: int) -> int:
    """Estimate: sm_90 allocates registers per warp in units of 256 and 1 KiB of shared per CTA."""
    warps = threads // 32
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = _SM_REGS // (regs_per_warp * warps)
    by_smem = _SM_SMEM // (smem + 1024)
    return max(0, min(by_regs, by_smem, _SM_THREADS // threads, _SM_CTAS))


def _info(kernel, grid) -> CompiledInfo:
    md = kernel.metadata
    res = _cuobjdump(kernel.asm["cubin"], "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    regs, stack = int(m.group(1)), int(m.group(2))
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    spills = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    tiles = _ttgir_tiles(ttgir)
    threshold = md.num_warps * 32 * 128
    accesses = [Access(line, kind, dict(sorted(w.items())), tiles.get((line, kind), 0),
                       tiles.get((line, kind), 0) >= threshold)
                for (line, kind), w in sorted(_ptx_accesses(ptx).items())]
    consts = {}
    for key, v in kernel.src.constants.items():
        name = kernel.src.fn.arg_names[key[0]] if isinstance(key, tuple) else key
        if isinstance(v, (int, float, str, bool)) or v is None:
            consts[name] = v
    return CompiledInfo(kernel=md.name, grid=tuple(int(g) for g in grid), num_warps=md.num_warps,
                        num_stages=md.num_stages, constexprs=consts, dots=_ttgir_dots(ttgir), regs=regs,
                        stack=stack, spills=spills, smem=md.shared, accesses=accesses,
                        ctas_per_sm=_ctas_per_sm(regs, md.num_warps * 32, md.shared),
                        ttgir=ttgir, ptx=ptx, sass=sass)


# ---------------------------------------------------------------------------------------------
# the stand-in driver
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def sm90_driver(record: list):
    """Inside: Triton targets sm_90a and records (CompiledKernel, grid) per launch into ``record``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90.compile_launch needs a process without TRITON_INTERPRET=1")
    import torch
    import triton
    import triton.testing
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.compiler import compiler as tc
    from triton.runtime import driver

    from virchow_fast.kernels import _common

    class _Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 1 << 30, "multiprocessor_count": H200_SMS, "max_num_regs": _SM_REGS,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024

    def launcher(src, metadata):
        def run(gx, gy, gz, stream, function, *rest):
            record.append((function, (gx, gy, gz)))
        return run

    class StandIn(DriverBase):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            return _bench

    def _bench(fn, *args, **kwargs):
        fn()  # compiles and records; the same time for every candidate keeps the launcher's default
        return 1.0

    original_init = tc.CompiledKernel._init_handles

    def init_handles(self):
        original_init(self)
        self.function = self  # the launch record gets the kernel itself

    saved = (triton.testing.do_bench, _common.sm_count, tc.CompiledKernel._init_handles, driver._active)
    driver.set_active(StandIn())
    triton.testing.do_bench = _bench
    _common.sm_count = lambda device: H200_SMS
    tc.CompiledKernel._init_handles = init_handles
    try:
        yield
    finally:
        triton.testing.do_bench, _common.sm_count, tc.CompiledKernel._init_handles, driver._active = saved


def compile_launch(fn, *args, **kwargs) -> list[CompiledInfo]:
    """Run ``fn(*args, **kwargs)`` with every Triton launch compiled for sm_90a, not run.

    Tensors are ordinary CPU tensors (``torch.empty`` of the real shapes: nothing is read, so
    their values do not matter); Triton sees their real strides and 16-byte alignment, as a CUDA
    allocation would give. Returns one :class:`CompiledInfo` per launch, in launch order.
    """
    record: list = []
    with sm90_driver(record):
        fn(*args, **kwargs)
    return [_info(k, grid) for k, grid in record]


def run_in_subprocess(module: str, func: str, timeout: float = 600) -> list[dict]:
    """Call ``module.func()`` (returning a list of JSON-able dicts) in a fresh process without
    TRITON_INTERPRET, for test sessions where Triton interprets; returns its result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), str(_REPO / "tests" / "kernels"), env.get("PYTHONPATH", "")])
    code = (f"import json, sys, {module} as m; sys.stdout.write('\\n@@JSON@@' + json.dumps(m.{func}()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or "@@JSON@@" not in proc.stdout:
        raise RuntimeError(f"{module}.{func} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.rsplit("@@JSON@@", 1)[1])
