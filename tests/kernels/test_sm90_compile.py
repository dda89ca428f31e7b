"""Compile-level performance contracts of every Triton kernel on sm_90a (H100 / H200), no GPU needed.

Every kernel is launched through its real launcher at the shipped models' shapes (ViT-H/14 at 32
tiles, ViT-G/14 at 24 tiles per GPU, all crops packed; heads at K=131072, bottleneck 256 and 384;
the optimizer step over one block's parameters; tests/kernels/sm90_cases.py) with a stand-in
driver that reports sm_90a, so each kernel gets the specialisation a real launch gets
(16-divisible ints and strides, 16-byte aligned pointers) and is compiled, not run
(tests/kernels/sm90.py). From the TTGIR, PTX and SASS of every launch:

- every ``tl.dot`` is on a tile of at least 64 rows and lowers to wgmma (no mma.sync, no FMA);
- no register spills (no local-memory instruction, no stack frame);
- shared memory within sm_90's 227 KiB per CTA;
- the bulk tiles (enough elements for 128 bits per thread) move with 128-bit loads and stores.

The compiles run in one subprocess without TRITON_INTERPRET (about 2 minutes with a cold Triton
cache; benchmarks/kernel_table.py prints the same launches as a table).
"""
from __future__ import annotations

import os

import pytest
import sm90
import sm90_cases

pytest.importorskip("triton")
CASES = sm90_cases.case_names()


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        results = sm90.run_in_subprocess("sm90_cases", "compile_all", timeout=1200)
    else:
        results = sm90_cases.compile_all()
    return {r["case"]: r for r in results}


def _violations(info: sm90.CompiledInfo) -> list[str]:
    bad = []
    for m, n, k, kind in info.dots:
        if m < 64:
            bad.append(f"dot {m}x{n}x{k}: tile of {m} rows (< 64, no wgmma)")
        elif kind != "wgmma":
            bad.append(f"dot {m}x{n}x{k}: {kind}, not wgmma")
    if info.spills or info.stack:
        bad.append(f"{info.spills} spill instructions, {info.stack} B stack at {info.regs} registers")
    if info.smem > sm90.SMEM_LIMIT:
        bad.append(f"{info.smem} B shared memory > {sm90.SMEM_LIMIT}")
    for kind in ("load", "store"):
        narrow = {w: n for w, n in info.widths(kind).items() if w < 128}
        if narrow:
            lines = sorted({a.line for a in info.accesses if a.kind == kind and a.bulk and min(a.widths) < 128})
            bad.append(f"bulk {kind}s narrower than 128 bits {narrow} (source lines {lines})")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_launches_meet_sm90_contracts(compiled, case):
    res = compiled[case]
    assert res["launches"], f"{case}: no Triton launch recorded"
    failures = []
    for d in res["launches"]:
        info = sm90.CompiledInfo.from_json(d)
        failures += [f"{info.describe()}: {v}" for v in _violations(info)]
    assert not failures, f"{case} ({res['shape']}):\n" + "\n".join(sorted(set(failures)))


def test_harness_reads_known_artefacts():
    """The parsers against hand-written TTGIR / PTX snippets (no compile)."""
    ttgir = "\n".join([
        '#loc = loc("k.py":3:0)',
        '#loc7 = loc("k.py":9:12)',
        '#loc8 = loc("x"(#loc7))',
        "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1]}>",
        "    %a = tt.load %p, %m : tensor<1024x!tt.ptr<bf16>, #blocked> loc(#loc8)",
        "    %d = tt.dot %x, %y, %c : tensor<32x64xbf16, #ttg.dot_operand<{opIdx = 0, parent = #mma}>> * "
        "tensor<64x128xbf16, #ttg.dot_operand<{opIdx = 1, parent = #mma}>> -> tensor<32x128xf32, #mma> loc(#loc7)",
        "    %e = ttng.warp_group_dot %x, %y, %c : !ttg.memdesc<64x32xbf16, #shared, #smem> * "
        "!ttg.memdesc<32x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma1> loc(#loc7)",
    ])
    assert sm90._ttgir_dots(ttgir) == [(32, 128, 64, "mma.sync"), (64, 64, 32, "wgmma")]
    assert sm90._ttgir_tiles(ttgir) == {(9, "load"): 1024 * 16}
    ptx = "\n".join([
        '\t.file\t1 "/x/k.py"',
        "\t.loc\t1 9 12",
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\tld.global.b16 { %rs1 }, [ %rd2 + 0 ];",
        "\t.loc\t1 11 3",
        "\t@!%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };",
        "\tcp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;",
        "\tcp.async.commit_group;",
    ])
    assert sm90._ptx_accesses(ptx) == {(9, "load"): {128: 1, 16: 1}, (11, "store"): {64: 1}, (11, "load"): {128: 1}}
    # 8 warps x 32 threads x 255 registers: one CTA; 4 warps x 64 registers x 48 KiB shared: 4
    assert sm90._ctas_per_sm(255, 256, 0) == 1 and sm90._ctas_per_sm(64, 128, 48 * 1024) == 4
