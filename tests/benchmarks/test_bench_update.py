"""benchmarks/bench_update.py's CPU smoke run: ours (kernels/adamw_ema.py under the interpreter), the
torch sequence the trainer ran before it and the eager reference, on awkward sizes; the script asserts
that all three give the same weights and that ours' bf16 copies are exact, and writes its JSON."""


def test_bench_update_smoke_agrees_and_writes_its_rows(bench_smoke):
    stdout, data = bench_smoke("bench_update")
    assert stdout.count("(asserted)") == 2  # both cases' weights checked against torch and the reference
    assert data["smoke"] is True
    impls = {(r["case"], r["impl"].split(" ")[0]) for r in data["rows"]}
    assert {(c, i) for c in ("one_gpu", "fsdp_rank") for i in ("ours", "torch", "eager")} <= impls
