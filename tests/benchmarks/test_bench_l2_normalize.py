"""benchmarks/bench_l2_normalize.py's CPU smoke run: our prototype weight norm (kernels/l2_normalize.py
under the interpreter) against F.normalize; the script asserts they agree, and writes its JSON."""


def test_bench_l2_normalize_smoke_agrees_and_writes_its_rows(bench_smoke):
    stdout, data = bench_smoke("bench_l2_normalize")
    assert "smoke check: ours == F.normalize (output and gradient)" in stdout
    assert data["smoke"] is True
    impls = {r["impl"] for r in data["rows"]}
    assert {"triton (ours), the model's call", "F.normalize (eager, the reference)"} <= impls
