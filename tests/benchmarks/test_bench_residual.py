"""benchmarks/bench_residual.py's CPU smoke run: the block's residual GEMM (addmm with
kernels/residual_weight.py under the interpreter) against timm's composition, both branches; the
script asserts that they give the same output and gradients, and writes its JSON."""


def test_bench_residual_smoke_agrees_and_writes_its_rows(bench_smoke):
    stdout, data = bench_smoke("bench_residual")
    assert stdout.count("smoke check: ours (in place and out of place) == eager composition") == 2  # proj, fc2
    assert data["smoke"] is True
    kinds = {(r["branch"], r["impl"].split(":")[0]) for r in data["rows"]}
    assert {(b, i) for b in ("proj", "fc2")
            for i in ("ours", "ours out of place (addmm", "timm composition, eager", "GEMM alone")} <= kinds
    assert all(r["x_ours"] == 1.0 for r in data["rows"] if r["impl"].startswith("ours:"))
