"""Training throughput and MFU per memory kind, at a named shape, on random tokens.

    memscale bench throughput                       # the default shape below, kinds none and rmt
    memscale bench throughput --kinds none,rmt,xl --steps 3 --rounds 2
    memscale bench throughput --device cuda --dtype bfloat16 --shape rmt-1b --kinds all

Shapes (`--shape`):
  default  the one the README's CPU table is measured at: d_model 512, 8 layers, 8 heads, vocab 16000, segment 512,
           16 memory tokens/slots, 4 streams x 2048 tokens per optimizer step (4 segments).
  rmt-1b   a ~1B-parameter RMT (configs/plan-1b.yaml's model: d_model 2048, 20 layers, 16 heads, vocab 32000,
           1.01B non-embedding parameters), 4 streams x 2 segments of 2048 tokens per step: the GPU shape. The
           segment is half the plan's 4096 to leave room, without activation checkpointing, for what xl and
           lamemo add (M = 2048 cached positions per layer; lamemo runs them through every block). Estimated,
           not measured: ~17 GB of weights and Adam state plus ~25 GB of bf16 activations for rmt, about twice
           the activations for lamemo.

Precision (`--dtype`): float32, or bfloat16 on CUDA, which is `train.dtype=bfloat16`: bf16 compute under autocast
with float32 weights, gradients, optimizer and memory state (memscale/train/precision.py). On CPU bfloat16 is
refused, as in training (bf16 matmuls are ~100x slower there).

Method on CPU. The matmul rate wanders by ~1.5x within minutes, so (1) kinds are timed in alternation, round after
round, and each kind keeps its best step; (2) the matmul peak is sampled between timed steps and the best sample is
the MFU denominator. On CUDA the rate is steady and a 1B model's weights and Adam state take ~17 GB per kind, so
kinds are timed one after another (each built, warmed up, timed `--rounds x --steps` times, freed); a kind that
runs out of device memory, or fails, gets a row saying so and the others still run (a failure makes the command
exit 1 after writing the result). MFU there is against the device's nominal dense bf16 (or tf32, for float32)
peak (`DEVICE_PEAKS`, or `--peak-tflops` for a device not listed), and also against the best sample of a large
matmul in the same dtype (`mfu_vs_matmul`).

Model FLOPs per token:

    6 x (non-embedding params + output projection) + 12 x layers x d_model x (mean attended key length)

i.e. PaLM's formula; memory tokens that are written but not read by the segment are overhead, not model FLOPs.

Executed FLOPs (CPU). Model FLOPs say what a kind is worth, not what it costs: xl also projects its cached
positions and forms a position term, lamemo runs its memory through every block. On CPU one untimed fwd+bwd per
kind is counted op by op (`memscale.utils.flops.executed_flops`), and the table gives each kind's executed
MFLOP/token, its rate, and "bound x none", none's count over the kind's: the `x none` the kind would reach at
none's FLOP rate. A kind short of it runs its work slower than none does; one at it can only go faster by doing
less.
"fwd+bwd" times `run_window` (forward and backward over one BPTT window); "step" adds gradient clipping and AdamW.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
import traceback
from typing import get_args

import torch

from memscale.bench import machine_info, now, write_result
from memscale.config import Config, MemoryKindName, config_from_dict, load_config, to_dict
from memscale.data.batch import Batch
from memscale.models import MemoryTransformer
from memscale.train.bptt import run_window
from memscale.train.optim import build_optimizer
from memscale.train.precision import autocast
from memscale.utils.flops import PeakMeter, executed_flops

SHAPES = {
    "default": [
        "model.d_model=512",
        "model.num_layers=8",
        "model.num_heads=8",
        "model.vocab_size=16000",
        "model.memory.num_tokens=16",
        "data.segment_len=512",
        "data.num_streams=4",
        "train.bptt_segments=4",
    ],
    "rmt-1b": [
        "model.d_model=2048",
        "model.num_layers=20",
        "model.num_heads=16",
        "model.vocab_size=32000",
        "model.memory.num_tokens=16",
        "data.segment_len=2048",
        "data.num_streams=4",
        "train.bptt_segments=2",
    ],
}
DEFAULT_SHAPE = SHAPES["default"]

DEVICE_PEAKS = [
    # (substring of torch.cuda.get_device_name(), dense bf16 FLOP/s, dense tf32 FLOP/s), the vendor's datasheet
    # numbers without sparsity; the first match wins, so the PCIe H100 precedes the SXM entry.
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("GH200", 989.4e12, 494.7e12),
    ("H200", 989.4e12, 494.7e12),
    ("H100", 989.4e12, 494.7e12),
    ("H800", 989.4e12, 494.7e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362.05e12, 183.2e12),
]


def device_peak(name: str, dtype: str) -> float | None:
    """The nominal dense peak of a CUDA device by its name, for `dtype` (bfloat16, or float32 as tf32), or None."""
    for key, bf16, tf32 in DEVICE_PEAKS:
        if key in name:
            return bf16 if dtype == "bfloat16" else tf32
    return None


def _kind_config(base: Config | None, overrides: list[str], kind: str, shape: str = "default") -> Config:
    # Kinds that carry gradient are timed with BPTT over the window (their training mode); the others detached.
    grad = "truncated" if kind in ("rmt", "memformer") else "detached"
    extra = [f"model.memory.kind={kind}", f"train.memory_grad={grad}"]
    if base is None:
        return config_from_dict({}, [*SHAPES[shape], *overrides, *extra])
    return config_from_dict(to_dict(base), [*overrides, *extra])


def _random_batches(cfg: Config, *, seed: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.data.num_streams, cfg.data.segment_len, cfg.model.vocab_size
    out = []
    for t in range(cfg.train.bptt_segments):
        tokens = torch.randint(0, V, (B, T + 1), generator=g)
        batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.full((B,), t == 0), torch.full((B,), t * T))
        out.append(batch.to(device))
    return out


def _meta_model(cfg: Config) -> MemoryTransformer:
    """`cfg`'s model on the meta device: its parameter and FLOP counts without memory or initialisation."""
    with torch.device("meta"):
        return MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)


class _MemscaleRunner:
    def __init__(self, cfg: Config, *, device: torch.device, dtype: str):
        torch.manual_seed(0)
        self.cfg, self.dtype, self.device = cfg, dtype, device
        # Built on the device itself (a 1B model initialised on the host first would take its CPU time and memory).
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len).to(device)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.train)
        self.batches = _random_batches(cfg, seed=0, device=device)
        self.state = self.model.init_state(cfg.data.num_streams)
        self.tokens = cfg.train.bptt_segments * cfg.data.num_streams * cfg.data.segment_len
        self.flops_per_token = self.model.flops_per_token()

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.dtype, self.device):  # train.dtype, as the trainer runs it
            r = run_window(self.model, self.batches, self.state, memory_grad=self.cfg.train.memory_grad)
        self.state = r.state

    def step(self) -> None:
        self.fwd_bwd()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


class _HFRunner:
    """A plain Hugging Face GPT-2 of the same shape (SDPA attention, no dropout): what a user would otherwise pick."""

    def __init__(self, cfg: Config, *, device: torch.device, dtype: str):
        from transformers import GPT2Config, GPT2LMHeadModel

        m, d = cfg.model, cfg.data
        hf_cfg = GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=d.segment_len,
            n_embd=m.d_model,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.d_ff or 4 * m.d_model,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").to(device)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # as memscale's
        self.batches = _random_batches(cfg, seed=0, device=device)
        self.tokens = cfg.train.bptt_segments * d.num_streams * d.segment_len
        self.dtype, self.device = dtype, device
        # Same formula as memscale's model, from the same shape: causal attention over the segment.
        none_cfg = config_from_dict(to_dict(cfg), ["model.memory.kind=none"])
        self.flops_per_token = _meta_model(none_cfg).flops_per_token()

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for b in self.batches:
            with autocast(self.dtype, self.device):
                out = self.model(input_ids=b.tokens_BT, labels=None)
                loss = torch.nn.functional.cross_entropy(
                    out.logits.flatten(0, 1).float(), b.targets_BT.flatten()
                )
            loss.backward()

    def step(self) -> None:
        self.fwd_bwd()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _count(r, device: torch.device) -> float | None:
    """Matmul FLOPs per token that one untimed fwd+bwd of `r` executes (memscale/utils/flops.py), on CPU; None on
    CUDA, where FlexAttention runs compiled and the dispatcher does not see its products."""
    if device.type != "cpu":
        return None
    return executed_flops(r.fwd_bwd) / r.tokens


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    *,
    base: Config | None,
    overrides: list[str],
    kinds: list[str],
    steps: int,
    rounds: int,
    hf: str,
    device: str = "cpu",
    dtype: str = "float32",
    shape: str = "default",
    peak_tflops: float | None = None,
    interleave: bool | None = None,
    log=print,
) -> dict:
    """Time every kind (and the GPT-2 reference); `interleave` (default: on CPU only) alternates the kinds round
    after round with every model built at once, else each kind is built, timed and freed in turn."""
    dev = torch.device(device)
    interleave = dev.type == "cpu" if interleave is None else interleave
    # The config says where and how it runs (`model.attention=flex` checks train.device), then the caller's.
    overrides = [f"train.device={dev.type}", f"train.dtype={dtype}", *overrides]
    factories = {
        kind: (
            lambda kind=kind: _MemscaleRunner(
                _kind_config(base, overrides, kind, shape), device=dev, dtype=dtype
            )
        )
        for kind in kinds
    }
    want_hf = hf == "on"
    if hf == "auto":
        try:
            import transformers  # noqa: F401

            want_hf = True
        except ImportError:
            log(
                "transformers is not installed: skipping the Hugging Face GPT-2 reference (pip install transformers)"
            )
    if want_hf:
        hf_cfg = _kind_config(base, overrides, "none", shape)
        factories["hf-gpt2"] = lambda: _HFRunner(hf_cfg, device=dev, dtype=dtype)
    # The matmul peak in the run's own dtype; on a GPU a large product (8192^3 bf16 is ~1 ms on an H100).
    mm = {"dtype": getattr(torch, dtype), "device": dev} | ({"n": 8192} if dev.type == "cuda" else {})
    peak = PeakMeter(**mm)
    best = {name: {"fwd_bwd": float("inf"), "step": float("inf")} for name in factories}
    info: dict[str, dict] = {name: {} for name in factories}

    def measure(name: str, r) -> None:
        for _ in range(steps):
            best[name]["fwd_bwd"] = min(best[name]["fwd_bwd"], _time(r.fwd_bwd, dev))
            best[name]["step"] = min(best[name]["step"], _time(r.step, dev))

    if interleave:
        runners = {name: make() for name, make in factories.items()}
        for r in runners.values():  # warm-up: allocator, thread pool, first-call costs
            r.step()
        executed = {name: _count(r, dev) for name, r in runners.items()}
        for rnd in range(rounds):
            for name, r in runners.items():
                peak.sample()
                measure(name, r)
            log(f"round {rnd + 1}/{rounds} done; best matmul sample so far {peak.best / 1e9:.0f} GFLOP/s")
        for name, r in runners.items():
            info[name] = {
                "tokens": r.tokens,
                "flops_per_token": r.flops_per_token,
                "executed": executed[name],
            }
        del runners
    else:
        for name, make in factories.items():
            r = None
            try:
                r = make()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                r.step()  # warm-up: allocator, kernel selection, Triton compiles
                executed = _count(r, dev)
                for _ in range(rounds):
                    peak.sample()
                    measure(name, r)
                info[name] = {"tokens": r.tokens, "flops_per_token": r.flops_per_token, "executed": executed}
                if dev.type == "cuda":
                    info[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
            except torch.OutOfMemoryError:
                info[name] = {"status": "out of memory"}
            except Exception as e:  # one kind's failure must not lose the others' timings (one-shot GPU runs)
                log(traceback.format_exc())
                info[name] = {"status": f"failed: {type(e).__name__}: {e}"[:300]}
            finally:
                del r
                _free(dev)
            done = info[name].get("status") or f"best step {best[name]['step']:.3f} s"
            log(f"{name}: {done}; best matmul sample so far {peak.best / 1e9:.0f} GFLOP/s")
    peak.sample()
    nominal = None
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if dev.type == "cuda":
        nominal = peak_tflops * 1e12 if peak_tflops else device_peak(device_name, dtype)
        if nominal is None:
            log(
                f"no nominal peak known for {device_name!r}: MFU is against the measured matmul "
                "(--peak-tflops to set one)"
            )
    denominator = nominal or peak.best
    rows = []
    hf_tps = none_tps = None
    if "tokens" in info.get("hf-gpt2", {}):
        hf_tps = info["hf-gpt2"]["tokens"] / best["hf-gpt2"]["fwd_bwd"]
    if "tokens" in info.get("none", {}):
        none_tps = info["none"]["tokens"] / best["none"]["fwd_bwd"]
    none_executed = info.get("none", {}).get("executed")
    for name in factories:
        if "status" in info[name]:
            rows.append({"kind": name, "status": info[name]["status"]})
            continue
        tokens, fpt, executed = info[name]["tokens"], info[name]["flops_per_token"], info[name]["executed"]
        tps_fb, tps_step = tokens / best[name]["fwd_bwd"], tokens / best[name]["step"]
        # What the kind could reach against `none` if it ran its executed matmuls at none's rate: the bound for
        # "x none" that the arithmetic sets, whatever the kernels.
        bound = none_executed / executed if executed and none_executed else None
        rows.append(
            {
                "kind": name,
                "tokens_per_step": tokens,
                "fwd_bwd_s": best[name]["fwd_bwd"],
                "step_s": best[name]["step"],
                "fwd_bwd_tokens_per_s": tps_fb,
                "step_tokens_per_s": tps_step,
                "flops_per_token": fpt,
                "mfu_fwd_bwd": tps_fb * fpt / denominator,
                "mfu_step": tps_step * fpt / denominator,
                "mfu_vs_matmul": tps_step * fpt / peak.best,
                "vs_hf_gpt2": tps_fb / hf_tps if hf_tps else None,
                "vs_none": tps_fb / none_tps if none_tps else None,
                "executed_flops_per_token": executed,
                "executed_flops_per_s": executed * tps_fb if executed else None,
                "work_bound_vs_none": bound,
            }
            | ({"peak_memory_gb": info[name]["peak_memory_gb"]} if "peak_memory_gb" in info[name] else {})
        )
    shape_cfg = _kind_config(base, overrides, "none", shape)
    return {
        "benchmark": "throughput",
        "date": now(),
        "machine": machine_info() | {"device": device_name},
        "shape": {
            "name": shape if base is None else "config",
            "d_model": shape_cfg.model.d_model,
            "num_layers": shape_cfg.model.num_layers,
            "num_heads": shape_cfg.model.num_heads,
            "vocab_size": shape_cfg.model.vocab_size,
            "segment_len": shape_cfg.data.segment_len,
            "num_streams": shape_cfg.data.num_streams,
            "bptt_segments": shape_cfg.train.bptt_segments,
            "memory_tokens": shape_cfg.model.memory.num_tokens,
            "non_embedding_params": _meta_model(shape_cfg).num_params(non_embedding=True),
            "dtype": dtype,
        },
        "order": "interleaved" if interleave else "sequential",
        "matmul_peak_flops": peak.best,
        "nominal_peak_flops": nominal,
        "mfu_denominator": "nominal" if nominal else "matmul",
        "flops_formula": "6 x (non-embedding params + output projection) + 12 x layers x d_model x mean attended keys",
        "executed_flops": "matmul FLOPs one fwd+bwd dispatches, per token (memscale.utils.flops.executed_flops); "
        "work_bound_vs_none = none's executed / the kind's",
        "rows": rows,
    }


def format_table(result: dict) -> str:
    cuda = result["machine"].get("device", "cpu") != "cpu"
    counted = any(r.get("executed_flops_per_token") for r in result["rows"])
    head = (
        f"{'kind':<10} {'fwd+bwd tok/s':>14} {'MFU fwd+bwd':>12} {'step tok/s':>11} {'MFU step':>9} "
        f"{'vs HF GPT-2':>12} {'x none':>7}"
        + (f" {'executed MFLOP/tok':>19} {'GFLOP/s':>8} {'bound x none':>13}" if counted else "")
        + (f" {'peak GB':>8}" if cuda else "")
    )
    lines = [head, "-" * len(head)]

    def ratio(x):
        return f"{x:.2f}x" if x is not None else "-"

    for r in result["rows"]:
        if "status" in r:
            lines.append(f"{r['kind']:<10} {r['status']}")
            continue
        work = ""
        if counted:
            fpt, rate = r.get("executed_flops_per_token"), r.get("executed_flops_per_s")
            work = (
                f" {fpt / 1e6 if fpt else float('nan'):>19.1f} {rate / 1e9 if rate else float('nan'):>8.0f}"
                f" {ratio(r.get('work_bound_vs_none')):>13}"
            )
        mem = f" {r['peak_memory_gb']:>8.1f}" if "peak_memory_gb" in r else ""
        lines.append(
            f"{r['kind']:<10} {r['fwd_bwd_tokens_per_s']:>14.0f} {r['mfu_fwd_bwd']:>12.3f} "
            f"{r['step_tokens_per_s']:>11.0f} {r['mfu_step']:>9.3f} {ratio(r['vs_hf_gpt2']):>12} "
            f"{ratio(r.get('vs_none')):>7}{work}{mem}"
        )
    dtype = result["shape"]["dtype"]
    if result["mfu_denominator"] == "nominal":
        lines.append(
            f"MFU against the device's nominal {dtype} peak, {result['nominal_peak_flops'] / 1e12:.1f} TFLOP/s; "
            f"best matmul sample {result['matmul_peak_flops'] / 1e12:.1f} TFLOP/s"
        )
    else:
        lines.append(f"matmul peak (best sample): {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s {dtype}")
    lines.append(f"FLOPs/token = {result['flops_formula']}")
    if counted:
        lines.append(
            "executed = the matmul FLOPs one fwd+bwd dispatches (memory rows, position terms, recomputation "
            "included); bound x none = none's executed / the kind's: its 'x none' at none's FLOP rate"
        )
    return "\n".join(lines)


def _parse_kinds(spec: str) -> list[str]:
    known = list(get_args(MemoryKindName))
    kinds = known if spec.strip() == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in known]
    if unknown or not kinds:
        raise SystemExit(
            f"bench throughput --kinds {spec!r}: {unknown or 'none'} not among {', '.join(known)}, all"
        )
    return kinds


def main(args) -> int:
    if args.config and args.shape != "default":
        raise SystemExit("bench throughput: --config and --shape both name the shape; give one")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench throughput --device cuda: no CUDA device here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"bench throughput --device {args.device}: expected cpu or cuda[:N]")
    if args.dtype == "bfloat16" and dev.type == "cpu":
        raise SystemExit(
            "bench throughput --dtype bfloat16 on cpu: bf16 matmuls are ~100x slower there; use float32 on CPU"
        )
    base = load_config(args.config) if args.config else None
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        result = run(
            base=base,
            overrides=args.overrides,
            kinds=_parse_kinds(args.kinds),
            steps=args.steps,
            rounds=args.rounds,
            hf=args.hf,
            device=args.device,
            dtype=args.dtype,
            shape=args.shape,
            peak_tflops=args.peak_tflops,
        )
    print(format_table(result))
    write_result(result, args.out, "throughput")
    failed = [r["kind"] for r in result["rows"] if r.get("status", "").startswith("failed")]
    if failed:
        print(f"bench throughput: {', '.join(failed)} failed (see the tracebacks above)", file=sys.stderr)
        return 1
    return 0
