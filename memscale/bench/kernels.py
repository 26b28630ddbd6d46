"""Each fused kernel against its eager reference, forward + backward, at training shapes, on one device.

    memscale bench kernels                       # CPU: the torch paths; Triton kernels reported "needs cuda"
    memscale bench kernels --device cuda         # GPU: the torch paths and the Triton kernels side by side

Rows (memscale/kernels/):
  - linear cross-entropy, N x D hidden states against a V x D projection (default 4 streams x 512 tokens, d 512,
    V 16000, the README's training shape): `eager` = F.cross_entropy(h @ W.T), which keeps the N x V logits and
    their log-softmax for backward; `torch chunked` = the chunked fused loss in torch ops; `triton chunked` = the
    same with the Triton loss-and-gradient kernel per chunk;
  - ∞-former Gaussian read, B x H x T queries against N basis functions (4 x 8 x 512, N 128, head width 64):
    `eager` = the model's torch read (keeps the B x H x T x N weights); `triton` = the fused kernels;
  - Memformer slot write, M slots over [own slot; T tokens] (4 x 8 heads, M 16, T 512, head width 64): `eager` =
    the model's masked SDPA; `triton` = the fused kernels;
  - rmt read/write attention, [K read; T segment; K write] under rmt's mask (4 x 8 heads, K 16, T 512, head
    width 64): `eager` = one SDPA call with the S x S mask (the CPU path and `model.attention=reference`);
    `split` = `read_write_attention`, three attentions with no mask tensor (the CUDA path);
  - relative-position attention (Transformer-XL's score, the CPU kernel of `model.attention=fused`), T queries over
    [M memory; T segment] keys (4 x 8 heads, T 512, M 512, head width 64): `eager` = the reference path of xl.py
    (AC and `rel_shift`ed BD materialised, BD handed to SDPA as a float mask that needs a gradient); `blockwise` =
    memscale/kernels/relative_attention.py; `flex` = FlexAttention (memscale/kernels/flex_relative_attention.py,
    `model.attention=flex`, CUDA only). The `+ lse` row is LaMemo's use of the same attention: its
    log-normaliser enters the loss too (eager: lamemo.py's hand softmax, which keeps it), so its gradient flows.
The implementations of a row are timed in alternation, `--rounds` times each, and the best time is kept (absolute
times wander on a shared machine; ratios within one run do not). The Triton interpreter is not timed: on CPU the
Triton rows say "needs cuda". With CUDA, the peak memory allocated during a call is reported too.
"""

from __future__ import annotations

import time

import torch

from memscale.bench import machine_info, now, write_result

NEEDS_CUDA = "needs cuda"


def _timer(fn, device: torch.device):
    def run() -> tuple[float, float | None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = None
        return time.perf_counter() - start, peak

    return run


def _cross_entropy_cases(args, device, dtype):
    from memscale.kernels.cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(args.tokens, args.d_model, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.d_model, generator=g) * 0.02).to(device, dtype).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)

    def case(loss_fn):
        def fn():
            h.grad = w.grad = None
            loss_fn().backward()

        return fn

    return {
        "eager": case(lambda: reference_linear_cross_entropy(h, w, y)),
        "torch chunked": case(lambda: fused_linear_cross_entropy(h, w, y, chunk=args.chunk, backend="torch")),
        "triton chunked": case(
            lambda: fused_linear_cross_entropy(h, w, y, chunk=args.chunk, backend="triton")
        ),
    }


def _gaussian_read_cases(args, device, dtype):
    from memscale.kernels.gaussian_read import gaussian_read
    from memscale.models.memory.infinity import basis_parameters

    g = torch.Generator().manual_seed(1)
    B, H, K = args.streams, args.heads, args.d_model // args.heads
    T, N = args.tokens // args.streams, args.num_basis
    mu_N, sigma_N = (t.to(device, dtype) for t in basis_parameters(N))
    mu = torch.sigmoid(torch.randn(B, H, T, generator=g)).to(device, dtype).requires_grad_()
    sigma_sq = (10 ** (torch.rand(B, H, T, generator=g) * 3 - 4)).to(device, dtype).requires_grad_()
    values = torch.randn(B, H, N, K, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(B, H, T, K, generator=g).to(device, dtype)

    def case(backend):
        def fn():
            mu.grad = sigma_sq.grad = values.grad = None
            gaussian_read(mu, sigma_sq, mu_N, sigma_N, values, backend=backend).backward(dout)

        return fn

    return {"eager": case("torch"), "triton": case("triton")}


def _slot_attention_cases(args, device, dtype):
    from memscale.kernels.slot_attention import slot_attention

    g = torch.Generator().manual_seed(2)
    B, H, K = args.streams, args.heads, args.d_model // args.heads
    M, T = args.slots, args.tokens // args.streams
    q = torch.randn(B, H, M, K, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, M + T, K, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, M + T, K, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(B, H, M, K, generator=g).to(device, dtype)
    eye_MM = torch.eye(M, dtype=torch.bool, device=device)
    mask_MS = torch.cat([eye_MM, torch.ones(M, T, dtype=torch.bool, device=device)], dim=1)
    scale = 1.0 / (K**0.5 * 0.5)  # the writer's default temperature, 0.5

    def case(backend):
        def fn():
            q.grad = k.grad = v.grad = None
            slot_attention(q, k, v, mask_MS=mask_MS, scale=scale, backend=backend).backward(dout)

        return fn

    return {"eager": case("torch"), "triton": case("triton")}


def _relative_attention_cases(args, device, dtype, *, with_lse: bool):
    from memscale.kernels.flex_relative_attention import flex_relative_attention
    from memscale.kernels.relative_attention import relative_attention
    from memscale.models.layers import sdpa
    from memscale.models.memory.lamemo import softmax_attend
    from memscale.models.memory.xl import causal_mask, rel_shift

    g = torch.Generator().manual_seed(3)
    B, H, K = args.streams, args.heads, args.d_model // args.heads
    T = args.tokens // args.streams
    M = T if args.mem_len is None else args.mem_len
    C = M + T

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    qu, qv = leaf(B, H, T, K), leaf(B, H, T, K)
    k, v = leaf(B, H, C, K), leaf(B, H, C, K)
    r_CHK = leaf(C, H, K)  # distances C-1 .. 0, Transformer-XL's order
    dout = torch.randn(B, H, T, K, generator=g).to(device, dtype)
    dlse = torch.randn(B, H, T, generator=g).to(device, torch.float32)
    mask = causal_mask(torch.ones(B, M, dtype=torch.bool, device=device), T, same_length=False, dtype=dtype)
    leaves = (qu, qv, k, v, r_CHK)

    def backward(o, lse=None):
        torch.autograd.backward([o, lse] if with_lse else [o], [dout, dlse] if with_lse else [dout])

    def eager():
        for t in leaves:
            t.grad = None
        bd = rel_shift(torch.einsum("bhtk,chk->bhtc", qv, r_CHK))
        if with_lse:  # lamemo.py's reference: materialised logits, hand softmax with its log-normaliser
            logits = (torch.einsum("bhtk,bhck->bhtc", qu, k) + bd) * K**-0.5 + mask
            backward(*softmax_attend(logits, v, dropout=0.0))
        else:  # xl.py's reference: BD * scale + mask as SDPA's float mask
            backward(sdpa(qu, k, v, attn_mask=bd * K**-0.5 + mask), None)

    def kernel(fn):
        def run():
            for t in leaves:
                t.grad = None
            backward(*fn(qu, qv, k, v, r_CHK, shift=M, return_lse=with_lse))

        return run

    return {
        "eager": eager,
        "blockwise": kernel(relative_attention),
        "flex": kernel(flex_relative_attention),
    }, leaves


def _read_write_attention_cases(args, device, dtype):
    from memscale.models.layers import Attention, sdpa
    from memscale.models.memory.rmt import read_write_attention

    g = torch.Generator().manual_seed(4)
    B, H, K = args.streams, args.heads, args.d_model // args.heads
    M, T = args.slots, args.tokens // args.streams
    S = M + T + M
    q, k, v = (torch.randn(B, H, S, K, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, S, K, generator=g).to(device, dtype)
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[:M, :M] = True
    mask[M : M + T, :M] = True
    mask[M : M + T, M : M + T] = torch.ones(T, T, dtype=torch.bool).tril()
    mask[M + T :] = True
    mask = mask.to(device)
    attn = Attention(args.d_model, args.heads).to(device)  # only its (dropout-free) `attend` is used

    def case(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(dout)

        return run

    return {
        "eager": case(lambda: sdpa(q, k, v, attn_mask=mask)),
        "split": case(lambda: read_write_attention(attn, q, k, v, M)),
    }, (q, k, v)


def _needs_cuda(impl: str) -> bool:
    return "triton" in impl or impl == "flex"


def _gradient_differences(cases: dict, leaves) -> dict[str, float]:
    """Each implementation's largest gradient difference from eager's, relative to the gradient's largest entry."""
    cases["eager"]()
    want = [t.grad.float().clone() for t in leaves]
    out = {}
    for name, fn in cases.items():
        fn()
        out[name] = max(
            float((t.grad.float() - w).abs().max() / w.abs().max().clamp_min(1e-30))
            for t, w in zip(leaves, want, strict=True)
        )
    return out


def main(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench kernels --device cuda: no CUDA device here; use --device cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise SystemExit(
            "bench kernels --dtype bfloat16 on cpu is ~100x slower than float32: use float32 on CPU"
        )
    if args.tokens % args.streams or args.d_model % args.heads:
        raise SystemExit(
            f"bench kernels: --streams {args.streams} must divide --tokens {args.tokens} and --heads "
            f"{args.heads} must divide --d-model {args.d_model}"
        )
    from memscale.kernels import triton_importable

    triton_ok = device.type == "cuda" and triton_importable()
    groups = {
        "linear cross-entropy": (
            _cross_entropy_cases(args, device, dtype),
            f"N={args.tokens} D={args.d_model} V={args.vocab} chunk={args.chunk}",
        ),
        "gaussian read": (
            _gaussian_read_cases(args, device, dtype),
            f"B={args.streams} H={args.heads} T={args.tokens // args.streams} N={args.num_basis} "
            f"K={args.d_model // args.heads}",
        ),
        "memformer slot write": (
            _slot_attention_cases(args, device, dtype),
            f"B={args.streams} H={args.heads} M={args.slots} T={args.tokens // args.streams} "
            f"K={args.d_model // args.heads}",
        ),
    }
    T = args.tokens // args.streams
    rel_shape = (
        f"B={args.streams} H={args.heads} T={T} M={T if args.mem_len is None else args.mem_len} "
        f"K={args.d_model // args.heads}"
    )
    # Rows whose implementations share their inputs (leaves): after timing, each one's gradients are compared with
    # eager's, so the table cannot time two different computations.
    checked: dict[str, tuple] = {}
    for name, with_lse in (("relative attention", False), ("relative attention + lse", True)):
        cases, checked[name] = _relative_attention_cases(args, device, dtype, with_lse=with_lse)
        groups[name] = (cases, rel_shape)
    cases, checked["rmt read/write attention"] = _read_write_attention_cases(args, device, dtype)
    groups["rmt read/write attention"] = (
        cases,
        f"B={args.streams} H={args.heads} K={args.slots} T={T} head={args.d_model // args.heads}",
    )
    rows = []
    for kernel, (cases, shape) in groups.items():
        # The Triton kernels and FlexAttention (compiled by inductor into Triton) run on CUDA only.
        runnable = {name: fn for name, fn in cases.items() if triton_ok or not _needs_cuda(name)}
        timers = {name: _timer(fn, device) for name, fn in runnable.items()}
        for fn in runnable.values():  # warm-up: Triton compiles, allocators settle
            fn()
        best: dict[str, float] = {}
        peak: dict[str, float | None] = {}
        for _ in range(args.rounds):
            for name, timer in timers.items():
                seconds, mb = timer()
                best[name] = min(best.get(name, seconds), seconds)
                peak[name] = mb
        diff = _gradient_differences(runnable, checked[kernel]) if kernel in checked else {}
        for name in cases:
            row = {"kernel": kernel, "impl": name, "shape": shape}
            if name in best:
                row |= {
                    "fwd_bwd_ms": 1000 * best[name],
                    "vs_eager": best["eager"] / best[name],
                    "peak_mb": peak[name],
                }
                if name in diff:
                    row["max_grad_diff"] = diff[name]
            else:
                row["status"] = NEEDS_CUDA if device.type != "cuda" else "triton does not import"
            rows.append(row)
    print(f"{'kernel':<24} {'impl':<16} {'fwd+bwd ms':>11} {'x eager':>8} {'peak MB':>8}  shape")
    for r in rows:
        if "fwd_bwd_ms" in r:
            mb = f"{r['peak_mb']:>8.1f}" if r["peak_mb"] is not None else f"{'-':>8}"
            check = (
                f"  (gradients within {r['max_grad_diff']:.1e} of eager's)" if "max_grad_diff" in r else ""
            )
            print(
                f"{r['kernel']:<24} {r['impl']:<16} {r['fwd_bwd_ms']:>11.2f} {r['vs_eager']:>8.2f} {mb}  "
                f"{r['shape']}{check}"
            )
        else:
            print(f"{r['kernel']:<24} {r['impl']:<16} {r['status']:>11} {'':>8} {'':>8}  {r['shape']}")
    result = {
        "benchmark": "kernels",
        "date": now(),
        "machine": machine_info() | {"device": str(device), "dtype": args.dtype},
        "settings": {k: getattr(args, k) for k in ("tokens", "streams", "d_model", "heads", "vocab", "chunk")}
        | {"num_basis": args.num_basis, "slots": args.slots, "mem_len": args.mem_len, "rounds": args.rounds},
        "rows": rows,
    }
    write_result(result, args.out, "kernels")
    return 0
