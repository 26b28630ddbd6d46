"""Training throughput and MFU per memory kind, at a named shape, on random tokens.

    memscale bench throughput                       # the default shape below, kinds none and rmt
    memscale bench throughput --kinds none,rmt,xl --steps 3 --rounds 2

Default shape (the one the README's table is measured at): d_model 512, 8 layers, 8 heads, vocab 16000,
segment 512, 16 memory tokens/slots, 4 streams x 2048 tokens per optimizer step (4 segments), fp32.

Method. This CPU's matmul rate wanders by ~1.5x within minutes, so (1) kinds are timed in alternation, round
after round, and each kind keeps its best step; (2) the matmul peak is sampled between timed steps and the best
sample is the MFU denominator. Model FLOPs per token:

    6 x (non-embedding params + output projection) + 12 x layers x d_model x (mean attended key length)

i.e. PaLM's formula; memory tokens that are written but not read by the segment are overhead, not model FLOPs.
"fwd+bwd" times `run_window` (forward and backward over one BPTT window); "step" adds gradient clipping and AdamW.
"""

from __future__ import annotations

import time

import torch

from memscale.bench import machine_info, now, write_result
from memscale.config import Config, config_from_dict, load_config, to_dict
from memscale.data.batch import Batch
from memscale.models import MemoryTransformer
from memscale.train.bptt import run_window
from memscale.train.optim import build_optimizer
from memscale.utils.flops import PeakMeter

DEFAULT_SHAPE = [
    "model.d_model=512",
    "model.num_layers=8",
    "model.num_heads=8",
    "model.vocab_size=16000",
    "model.memory.num_tokens=16",
    "data.segment_len=512",
    "data.num_streams=4",
    "train.bptt_segments=4",
]


def _kind_config(base: Config | None, overrides: list[str], kind: str) -> Config:
    # Kinds that carry gradient are timed with BPTT over the window (their training mode); the others detached.
    grad = "truncated" if kind in ("rmt", "memformer") else "detached"
    extra = [f"model.memory.kind={kind}", f"train.memory_grad={grad}"]
    if base is None:
        return config_from_dict({}, [*DEFAULT_SHAPE, *overrides, *extra])
    return config_from_dict(to_dict(base), [*overrides, *extra])


def _random_batches(cfg: Config, *, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.data.num_streams, cfg.data.segment_len, cfg.model.vocab_size
    out = []
    for t in range(cfg.train.bptt_segments):
        tokens = torch.randint(0, V, (B, T + 1), generator=g)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], torch.full((B,), t == 0), torch.full((B,), t * T)))
    return out


class _MemscaleRunner:
    def __init__(self, cfg: Config):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.train)
        self.batches = _random_batches(cfg, seed=0)
        self.state = self.model.init_state(cfg.data.num_streams)
        self.tokens = cfg.train.bptt_segments * cfg.data.num_streams * cfg.data.segment_len
        self.flops_per_token = self.model.flops_per_token()

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        r = run_window(self.model, self.batches, self.state, memory_grad=self.cfg.train.memory_grad)
        self.state = r.state

    def step(self) -> None:
        self.fwd_bwd()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


class _HFRunner:
    """A plain Hugging Face GPT-2 of the same shape (SDPA attention, no dropout): what a user would otherwise pick."""

    def __init__(self, cfg: Config):
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
        self.model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=True)
        self.batches = _random_batches(cfg, seed=0)
        self.tokens = cfg.train.bptt_segments * d.num_streams * d.segment_len
        # Same formula as memscale's model, from the same shape: causal attention over the segment.
        probe = MemoryTransformer(
            config_from_dict(to_dict(cfg), ["model.memory.kind=none"]).model, segment_len=d.segment_len
        )
        self.flops_per_token = probe.flops_per_token()

    def fwd_bwd(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for b in self.batches:
            out = self.model(input_ids=b.tokens_BT, labels=None)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), b.targets_BT.flatten())
            loss.backward()

    def step(self) -> None:
        self.fwd_bwd()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(
    *,
    base: Config | None,
    overrides: list[str],
    kinds: list[str],
    steps: int,
    rounds: int,
    hf: str,
    log=print,
) -> dict:
    runners: dict[str, object] = {}
    for kind in kinds:
        runners[kind] = _MemscaleRunner(_kind_config(base, overrides, kind))
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
        runners["hf-gpt2"] = _HFRunner(_kind_config(base, overrides, "none"))
    peak = PeakMeter()
    best = {name: {"fwd_bwd": float("inf"), "step": float("inf")} for name in runners}
    for r in runners.values():  # warm-up: allocator, thread pool, first-call costs
        r.step()
    for rnd in range(rounds):
        for name, r in runners.items():
            peak.sample()
            for _ in range(steps):
                best[name]["fwd_bwd"] = min(best[name]["fwd_bwd"], _time(r.fwd_bwd))
                best[name]["step"] = min(best[name]["step"], _time(r.step))
        log(f"round {rnd + 1}/{rounds} done; best matmul sample so far {peak.best / 1e9:.0f} GFLOP/s")
    peak.sample()
    rows = []
    hf_tps = None
    if "hf-gpt2" in runners:
        hf_tps = runners["hf-gpt2"].tokens / best["hf-gpt2"]["fwd_bwd"]
    for name, r in runners.items():
        tps_fb = r.tokens / best[name]["fwd_bwd"]
        tps_step = r.tokens / best[name]["step"]
        rows.append(
            {
                "kind": name,
                "tokens_per_step": r.tokens,
                "fwd_bwd_s": best[name]["fwd_bwd"],
                "step_s": best[name]["step"],
                "fwd_bwd_tokens_per_s": tps_fb,
                "step_tokens_per_s": tps_step,
                "flops_per_token": r.flops_per_token,
                "mfu_fwd_bwd": tps_fb * r.flops_per_token / peak.best,
                "mfu_step": tps_step * r.flops_per_token / peak.best,
                "vs_hf_gpt2": tps_fb / hf_tps if hf_tps else None,
            }
        )
    shape_cfg = _kind_config(base, overrides, "none")
    return {
        "benchmark": "throughput",
        "date": now(),
        "machine": machine_info(),
        "shape": {
            "d_model": shape_cfg.model.d_model,
            "num_layers": shape_cfg.model.num_layers,
            "num_heads": shape_cfg.model.num_heads,
            "vocab_size": shape_cfg.model.vocab_size,
            "segment_len": shape_cfg.data.segment_len,
            "num_streams": shape_cfg.data.num_streams,
            "bptt_segments": shape_cfg.train.bptt_segments,
            "memory_tokens": shape_cfg.model.memory.num_tokens,
            "dtype": "float32",
        },
        "matmul_peak_flops": peak.best,
        "flops_formula": "6 x (non-embedding params + output projection) + 12 x layers x d_model x mean attended keys",
        "rows": rows,
    }


def format_table(result: dict) -> str:
    head = (
        f"{'kind':<10} {'fwd+bwd tok/s':>14} {'MFU fwd+bwd':>12} {'step tok/s':>11} {'MFU step':>9} "
        f"{'vs HF GPT-2':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        vs = f"{r['vs_hf_gpt2']:.2f}x" if r["vs_hf_gpt2"] is not None else "-"
        lines.append(
            f"{r['kind']:<10} {r['fwd_bwd_tokens_per_s']:>14.0f} {r['mfu_fwd_bwd']:>12.3f} "
            f"{r['step_tokens_per_s']:>11.0f} {r['mfu_step']:>9.3f} {vs:>12}"
        )
    lines.append(
        f"matmul peak (best sample): {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s fp32; "
        f"FLOPs/token = {result['flops_formula']}"
    )
    return "\n".join(lines)


def main(args) -> int:
    base = load_config(args.config) if args.config else None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    result = run(
        base=base, overrides=args.overrides, kinds=kinds, steps=args.steps, rounds=args.rounds, hf=args.hf
    )
    print(format_table(result))
    write_result(result, args.out, "throughput")
    return 0
