"""Compile every Triton kernel of memscale ahead of time for NVIDIA GPUs, on a machine that has none.

    python tests/triton_aot_entry.py            # prints one JSON line per compiled kernel

The launchers (memscale/kernels/triton/*.py) are called with CPU tensors at training shapes while
`JITFunction.run` only records each launch (kernel, arguments, launch options): so the block sizes, dtypes and
options compiled below are the ones the launchers choose, not a copy of them. Each recorded launch is then
compiled by Triton's own compiler for Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) down to a cubin with
the ptxas that ships in the triton wheel; no driver is touched. This catches what the CPU interpreter cannot: code
the GPU compiler rejects (tl.dot shapes, dtypes, layouts, register limits at the chosen block sizes).

Run in its own process (tests/test_triton_compile.py): `@triton.jit` decides at import whether a kernel is
interpreted, and tests/conftest.py sets TRITON_INTERPRET=1 for the interpreter tests in theirs.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
POINTER = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}
OPTIONS = ("num_warps", "num_stages", "num_ctas")

launches: list[tuple[JITFunction, dict, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    names = [p.name for p in self.params]
    bound = dict(zip(names, args, strict=False))
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound.update(kwargs)
    launches.append((self, bound, options))


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def record_training_launches() -> None:
    """Forward and backward of every kernel at the training shape (README: 4 streams x 512 tokens, d 512, 8 heads,
    V 16000; the read with N = 128 basis functions, the write with 16 slots), in float32 and bfloat16."""
    from memscale.kernels.triton import cross_entropy, gaussian_read, slot_attention

    JITFunction.run = _record
    G, T, K, N, M, V = 4 * 8, 512, 64, 128, 16, 16000
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(64, V, dtype=dtype)
        targets = torch.zeros(64, dtype=torch.int64)
        for write_grad in (False, True):
            cross_entropy.cross_entropy_loss_grad_(logits, targets, ignore_index=-100, write_grad=write_grad)
        mu, s = torch.rand(G, T, dtype=dtype), torch.rand(G, T, dtype=dtype)
        c, w = torch.rand(N, dtype=dtype), torch.rand(N, dtype=dtype)
        v, dout = torch.rand(G, N, K, dtype=dtype), torch.rand(G, T, K, dtype=dtype)
        gaussian_read.gaussian_read_fwd(mu, s, c, w, v)
        gaussian_read.gaussian_read_bwd(mu, s, c, w, v, dout)
        q, k, vv = (
            torch.rand(G, M, K, dtype=dtype),
            torch.rand(G, M + T, K, dtype=dtype),
            torch.rand(G, M + T, K),
        )
        vv = vv.to(dtype)
        o, lse = slot_attention.slot_attention_fwd(q, k, vv, scale=K**-0.5)
        slot_attention.slot_attention_bwd(q, k, vv, o, lse, torch.rand_like(q), scale=K**-0.5)


def main() -> int:
    record_training_launches()
    if not launches:
        print("no Triton launch was recorded", file=sys.stderr)
        return 1
    for fn, bound, options in launches:
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
        signature = {p.name: "constexpr" if p.is_constexpr else _type(bound[p.name]) for p in fn.params}
        for target_name, target in TARGETS.items():
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=options)
            print(
                json.dumps(
                    {
                        "kernel": fn.__name__,
                        "target": target_name,
                        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                        "constexprs": constexprs,
                        "options": options,
                        "cubin_bytes": len(compiled.asm["cubin"]),
                        "shared_bytes": compiled.metadata.shared,
                        "triton": triton.__version__,
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
