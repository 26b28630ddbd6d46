"""The benchmark commands run end to end at tiny shapes and write their JSON (numbers are not asserted: they are
measurements, compared only within one run)."""

import json
import os
import subprocess
import sys

import pytest
import torch

TINY = "--set model.d_model=32 --set model.num_layers=1 --set model.num_heads=2".split()


def _run(*args):
    r = subprocess.run([sys.executable, "-m", "memscale.cli", "bench", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_throughput(tmp_path):
    args = "throughput --kinds none,rmt,xl --steps 1 --rounds 1 --hf off --set model.vocab_size=100"
    out = _run(*args.split(), *TINY, "--set", "data.segment_len=16", "--out", str(tmp_path))
    assert "MFU" in out
    (path,) = tmp_path.glob("throughput-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["none", "rmt", "xl"]
    assert all(r["fwd_bwd_tokens_per_s"] > 0 and 0 < r["mfu_fwd_bwd"] for r in rows)
    # The executed work is counted on CPU: xl attends over its memory too, so it does more than none, whose
    # bound against itself is 1.
    work = {r["kind"]: r["executed_flops_per_token"] for r in rows}
    assert 0 < work["none"] < work["xl"]
    assert rows[0]["work_bound_vs_none"] == 1.0 and rows[0]["vs_none"] == 1.0
    assert rows[2]["work_bound_vs_none"] == work["none"] / work["xl"]
    assert "bound x none" in out


def test_bench_throughput_sequential_and_out_of_memory(monkeypatch):
    """The GPU order (each kind built, timed and freed in turn), run on CPU: every kind gets its row, and a kind
    that runs out of device memory or fails gets a row saying so while the others are still timed."""
    from memscale.bench import throughput

    class Runner(throughput._MemscaleRunner):
        def __init__(self, cfg, **kw):
            if cfg.model.memory.kind == "xl":
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            super().__init__(cfg, **kw)

        def fwd_bwd(self):
            if self.cfg.model.memory.kind == "memformer":
                raise RuntimeError("a kernel failed (simulated)")
            super().fwd_bwd()

    monkeypatch.setattr(throughput, "_MemscaleRunner", Runner)
    tiny = ["model.vocab_size=100", "model.d_model=32", "model.num_layers=1", "model.num_heads=2"]
    result = throughput.run(
        base=None,
        overrides=[*tiny, "data.segment_len=16"],
        kinds=["none", "xl", "memformer", "rmt"],
        steps=1,
        rounds=2,
        hf="off",
        interleave=False,
        log=lambda *_: None,
    )
    assert result["order"] == "sequential" and result["mfu_denominator"] == "matmul"
    rows = {r["kind"]: r for r in result["rows"]}
    assert list(rows) == ["none", "xl", "memformer", "rmt"]
    assert rows["xl"] == {"kind": "xl", "status": "out of memory"}
    assert rows["memformer"]["status"] == "failed: RuntimeError: a kernel failed (simulated)"
    assert all(rows[k]["step_tokens_per_s"] > 0 and rows[k]["mfu_step"] > 0 for k in ("none", "rmt"))
    assert "out of memory" in throughput.format_table(result)


def test_bench_throughput_without_a_count(monkeypatch):
    """Where the executed work is not counted (CUDA: FlexAttention runs compiled), rows say None and the table
    leaves the work columns out rather than printing a bound it does not have."""
    from memscale.bench import throughput

    monkeypatch.setattr(throughput, "_count", lambda r, device: None)
    tiny = ["model.vocab_size=100", "model.d_model=32", "model.num_layers=1", "model.num_heads=2"]
    result = throughput.run(
        base=None,
        overrides=[*tiny, "data.segment_len=16"],
        kinds=["none", "xl"],
        steps=1,
        rounds=1,
        hf="off",
        log=lambda *_: None,
    )
    for row in result["rows"]:
        assert row["executed_flops_per_token"] is None and row["work_bound_vs_none"] is None
        assert row["vs_none"] > 0
    table = throughput.format_table(result)
    assert "x none" in table and "bound x none" not in table and "executed" not in table


def test_bench_throughput_shapes_and_peaks():
    """The GPU shape is a ~1B-parameter RMT (counted on the meta device), and MFU's nominal peaks are found by
    device name, the PCIe H100 before the SXM one."""
    from memscale.bench.throughput import _kind_config, _meta_model, device_peak

    cfg = _kind_config(None, [], "rmt", "rmt-1b")
    assert cfg.model.memory.kind == "rmt" and cfg.data.segment_len == 2048
    assert 0.95e9 < _meta_model(cfg).num_params(non_embedding=True) < 1.1e9
    assert device_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert device_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
    assert device_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert device_peak("NVIDIA GeForce RTX 4090", "bfloat16") is None


@pytest.mark.parametrize(
    "args, message",
    [
        ("--dtype bfloat16", "bf16 matmuls are ~100x slower there"),
        ("--config configs/quickstart.yaml --shape rmt-1b", "give one"),
        ("--kinds none,rnn", "not among"),
    ]
    + ([] if torch.cuda.is_available() else [("--device cuda", "no CUDA device here")]),
)
def test_bench_throughput_refuses(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "memscale.cli", "bench", "throughput", *args.split()],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_tasks(tmp_path):
    args = "tasks --kinds none,rmt --tasks copy --segments 4 --max-steps 4 --eval-every 2 --set data.num_streams=2"
    _run(*args.split(), *TINY, "--out", str(tmp_path))
    (path,) = tmp_path.glob("tasks-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["kind"], r["segments"]) for r in rows} == {("none", 4), ("rmt", 4)}
    assert all(r["steps"] == 4 and 0 <= r["accuracy"] <= 1 for r in rows)


def test_bench_long(tmp_path):
    args = "long --tokens 512,2048 --train-kinds rmt --eval-kinds none --set data.segment_len=128"
    _run(*args.split(), *TINY, "--set", "model.vocab_size=256", "--out", str(tmp_path))
    (path,) = tmp_path.glob("long-*.json")
    rows = json.loads(path.read_text())["rows"]
    train = [r for r in rows if r["mode"] == "train"]
    assert [r["tokens"] for r in train] == [512, 2048] and all(r["memory_grad"] == "replay" for r in train)
    assert all(r["peak_rss_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_parallel_census_counts_weights_grads_and_moments_once():
    """The memory census of `memscale bench parallel`: an AdamW model after backward holds 4P weight, 4P gradient
    and 8P moment bytes (fp32), each storage counted once (a tied weight, and a view, do not count twice). In a
    fresh process: the census sees every live tensor of its process."""
    code = """
import torch
from memscale.bench.parallel import expected_saving, live_tensor_bytes

emb = torch.nn.Embedding(1000, 64)
head = torch.nn.Linear(64, 1000, bias=False)
head.weight = emb.weight  # tied
mlp = torch.nn.Linear(64, 64)
params = [emb.weight, mlp.weight, mlp.bias]
opt = torch.optim.AdamW(params, lr=1e-3)
view = emb.weight.detach()[:10]  # a view of a parameter's storage
head(mlp(emb(torch.arange(8)))).sum().backward()
opt.step()
P = sum(p.numel() for p in params)
got = live_tensor_bytes(opt)
assert got["weights"] == 4 * P, got
assert got["grads"] == 4 * P, got
assert got["optimizer"] == 8 * P + 3 * 4, got  # exp_avg, exp_avg_sq and a float32 step per parameter
assert expected_saving(1, 1000, 2) == (4000, 2000)
assert expected_saving(3, 1000, 4) == (12000, 11000)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bench_plan(tmp_path):
    """One single-process run at a tiny shape: the prediction and the measurement are both there and positive."""
    args = (
        "plan --runs one --steps 2 --set model.d_model=32 --set model.num_heads=2 --set data.segment_len=32"
    )
    out = _run(*args.split(), "--out", str(tmp_path))
    assert "predicted / measured" in out
    (path,) = tmp_path.glob("plan-*.json")
    result = json.loads(path.read_text())
    (row,) = result["runs"]
    assert row["run"] == "one" and row["predicted_step_s"] > 0 and row["measured_step_s"] > 0
    assert result["gloo"]["allreduce_Bps"] > 0 and result["matmul_peak_flops"]["2"] > 0


def test_bench_prepare(tmp_path):
    out = _run("prepare", "--size-mb", "2", "--small-mb", "1", "--workers", "1,2", "--vocab-size", "1000",
               "--out", str(tmp_path))  # fmt: skip
    assert "sentencepiece MB/s" in out
    (path,) = tmp_path.glob("prepare-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["workers"], "ratio" in r) for r in rows] == [(1, True), (2, True), (1, False), (2, False)]
    assert rows[0]["corpus_mb"] > rows[2]["corpus_mb"] > 0.9
    assert all(r["tokens"] > 0 and r["prepare_mb_per_s"] > 0 and r["peak_pss_mb"] > 0 for r in rows)
    # prepare and sentencepiece encoded the same text into the same number of tokens (checked by the bench).
    assert rows[0]["tokens"] == rows[1]["tokens"]


def test_bench_kernels_cpu(tmp_path):
    """On CPU the torch paths are timed against eager and the Triton rows say "needs cuda" (the interpreter is
    not timed); the loss and read shapes are tiny but the loss spans several chunks (256 rows, chunks of 64) and
    the relative attention several query blocks (T = 128 queries over M + T = 160 keys, blocks of 64)."""
    args = "kernels --device cpu --tokens 256 --streams 2 --d-model 32 --heads 2 --vocab 300 --chunk 64"
    extra = ["--num-basis", "40", "--slots", "4", "--mem-len", "32", "--rounds", "1", "--out", str(tmp_path)]
    out = _run(*args.split(), *extra)
    assert "needs cuda" in out
    (path,) = tmp_path.glob("kernels-*.json")
    rows = {(r["kernel"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {
        ("linear cross-entropy", "eager"),
        ("linear cross-entropy", "torch chunked"),
        ("linear cross-entropy", "triton chunked"),
        ("gaussian read", "eager"),
        ("gaussian read", "triton"),
        ("memformer slot write", "eager"),
        ("memformer slot write", "triton"),
        ("relative attention", "eager"),
        ("relative attention", "blockwise"),
        ("relative attention", "flex"),
        ("relative attention + lse", "eager"),
        ("relative attention + lse", "blockwise"),
        ("relative attention + lse", "flex"),
        ("rmt read/write attention", "eager"),
        ("rmt read/write attention", "split"),
    }
    cuda_only = {r["impl"] for r in rows.values() if "triton" in r["impl"]} | {"flex"}
    timed = [r for r in rows.values() if r["impl"] not in cuda_only]
    assert all(r["fwd_bwd_ms"] > 0 and r["vs_eager"] > 0 for r in timed)
    assert all(r["status"] == "needs cuda" for r in rows.values() if r["impl"] in cuda_only)
    # The bench compares what it times: the blockwise kernel's gradients are eager's (float32 sums in another
    # order: within 1e-5 of the largest entry).
    for kernel in ("relative attention", "relative attention + lse"):
        assert rows[(kernel, "blockwise")]["shape"] == "B=2 H=2 T=128 M=32 K=16"
        assert rows[(kernel, "eager")]["max_grad_diff"] == 0
        assert 0 < rows[(kernel, "blockwise")]["max_grad_diff"] < 1e-5
    # rmt's split attention (the CUDA path) runs on CPU too: K = 4 read and write tokens around T = 128.
    assert rows[("rmt read/write attention", "split")]["shape"] == "B=2 H=2 K=4 T=128 head=16"
    assert rows[("rmt read/write attention", "split")]["max_grad_diff"] < 1e-5


def test_gpu_check_script_refuses_without_cuda(tmp_path):
    """tools/gpu_check.sh, the one command for a GPU machine, stops with one line and writes nothing where no CUDA
    device is visible (on a GPU machine it is run, not tested)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run")
    out = tmp_path / "gpu"
    r = subprocess.run(
        ["bash", "tools/gpu_check.sh", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 2 and "sees no CUDA device" in r.stderr and not out.exists(), r.stderr


def test_gpu_check_script_runs_its_steps_and_reports_failures(tmp_path):
    """The script's plumbing, on CPU: with an interpreter that claims a GPU (a wrapper answering the script's CUDA
    probe), a chosen step (STEPS) runs, fails here for want of CUDA, and the script logs it, goes on and exits 1."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = -c ] && [[ "$2" == *cuda.is_available* ]]; then exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "gpu"
    r = subprocess.run(
        ["bash", "tools/gpu_check.sh", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(wrapper), "STEPS": "kernels-fp32 throughput-1b-flex"},
    )
    log = (out / "gpu-check.log").read_text()
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "== kernels-fp32: exit 1" in log and "no CUDA device here" in log
    assert "== throughput-1b-flex: exit 1" in log
    assert "== tests" not in log and "== kernels-bf16" not in log
    assert "2 step(s) failed" in log
