"""The benchmark scripts run end to end on tiny shapes and compare what they claim to compare (no timings asserted)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bench_agreement_and_exactness_are_float32_rounding(tmp_path):
    """bench.py's PEFT agreement (a PEFT folder read by from_peft) and float64 exactness rows are ~1e-7, every method
    timed: a stale or mismatched set-up would show as O(1) errors."""
    _run(tmp_path, "benchmarks/bench.py", "--preset", "tiny", env={"OUT": str(tmp_path)})
    res = json.loads((tmp_path / "bench_tiny.json").read_text())
    errors = [v for row in res["agreement"] + res["exactness"] for k, v in row.items() if isinstance(v, float) and k != "tokens"]
    assert res["agreement"] and res["exactness"] and max(errors) < 1e-5
    assert {r["method"] for r in res["model"]} == {"PEFT LoRA r", "PEFT RandLoRA", "ours", "full FT"}
    assert all(r["ms"] > 0 for r in res["model"] + res["layers"] if "ms" in r)


def test_bench_small_eager_runs_every_method(tmp_path):
    """bench_small.py builds each method at equal trainable count on the listed targets and records every run as ok."""
    out = tmp_path / "small.json"
    _run(tmp_path, "benchmarks/bench_small.py", "--tiny", "--shapes", "tiny-llama", "--modes", "eager", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["finished"] and {r["method"] for r in res["runs"]} == {"frozen", "lora", "ours", "randlora"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in res["runs"])


def test_compiled_code_writes_each_graph_and_counts_its_inputs(tmp_path):
    """compiled_code.py compiles a bench_small shape's step per method, writes inductor's code for the forward and
    the backward graph, and counts the forward's inputs (test_scale.py pins the bases' share of them)."""
    proc = subprocess.run([sys.executable, "benchmarks/compiled_code.py", "--device", "cpu", "--shape", "tiny-bert",
                           "--methods", "ours", "--steps", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    graphs = (tmp_path / "code_ours.txt").read_text().split("#### NEXT GRAPH ####")
    assert len(graphs) == 2 and all("def call(" in g for g in graphs)
    n_inputs = int(proc.stdout.split("ours graph 0: inputs ")[1].split(",")[0])
    assert n_inputs >= 12 * 4, n_inputs  # at least W, b, lam and gam of each of the 12 adapted layers (2 blocks x 6)
    assert "host ms" in proc.stdout


def test_host_overhead_times_every_method_and_the_floors_compute_ours(tmp_path):
    """host_overhead.py times each method; its two floors (the same update as a bare autograd.Function, and from
    built-in operations) are checked against ours before timing, so the floors it reports compute what ours computes;
    and it counts what autograd keeps: ours the input alone, the built-in floor S (r*n x d) beside it."""
    out = tmp_path / "host.json"
    _run(tmp_path, "benchmarks/host_overhead.py", "--tiny", "--methods", "frozen,lora,ours,bare,builtin,ours-torch",
         "--json", str(out))
    res = json.loads(out.read_text())
    assert {e["method"] for e in res["methods"].values()} == {"frozen", "lora", "ours", "bare", "builtin", "ours-torch"}
    assert all(e["status"] == "ok" and e["median_us"] > 0 for e in res["methods"].values())
    saved = {e["method"]: e["saved_bytes_per_layer"] for e in res["methods"].values()}
    x_bytes, S_bytes = 4 * 64 * 4, 64 * 64 * 4  # float32 x (4 tokens x 64) and S (r*n = 64 x 64)
    assert saved["ours"] == saved["bare"] == x_bytes < saved["lora"]
    assert saved["builtin"] == x_bytes + S_bytes


def test_flops_on_meta_count_what_a_real_step_computes(monkeypatch):
    """flops.py counts on the meta device: each method's matmuls (mm, addmm: every linear layer and adapter) count as
    in the same step run on the CPU (whose fused attention kernel torch's counter skips; meta runs attention as bmm),
    and the exact full-rank update costs more than LoRA's (the arithmetic floor the README cites)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_small
    import flops

    for name in ("tiny-bert", "tiny-qwen2"):
        spec = bench_small.parse_shape(name)
        info = bench_small.shape_info(spec)
        counts = {m: flops.step_macs(spec, info, m) for m in flops.METHODS}
        for m in flops.METHODS:
            cpu = flops.step_macs(spec, info, m, device="cpu")[1]
            assert [counts[m][1].get(op) for op in ("aten.mm", "aten.addmm")] == [cpu.get(op) for op in ("aten.mm", "aten.addmm")]
        assert counts["frozen"][0] < counts["lora"][0] < counts["ours"][0], (name, counts)


def test_fp16_precision_compares_the_same_update(tmp_path):
    """fp16_precision.py: in float16 ours is as precise as PEFT (the update in float32); both references agree (the
    script asserts it); every row has both methods."""
    out = tmp_path / "p.json"
    _run(tmp_path, "benchmarks/fp16_precision.py", "--width", "64", "--rank", "4", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"} and len(rows) == 8
    for r in rows:
        assert 0 < r["peft"]["update"] < 1e-2 and 0 < r["ours"]["update"] < 1e-2, r
        if r["dtype"] == "float16":
            assert r["ours"]["update"] < 2 * r["peft"]["update"] and r["ours"]["dlam"] < 1e-5, r
