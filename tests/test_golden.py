"""Golden seeded loss curves: every kind trained 20 optimizer steps through the real `Trainer`, step by step.

A refactor of the model or the loop must reproduce these losses (same ops in the same order on one thread, same RNG
draws, same data: bitwise on one machine, to 1e-6 relative across CPUs, see the check below); one that reorders
fp32 sums on purpose says so here. A
change that is meant to alter training (an optimizer fix, a new initialisation) re-records them in the same
commit and says so.

History. The curves were first recorded with the fused q/k/v rows stacked [3, H, K]; laying them out per head
([H, 3, K]) left the forward pass unchanged bit for bit but summed the projection's input gradient in another
order, and the curves then drifted by the last fp32 bit (at most 8.2e-8 relative over 20 steps, checked at 1e-6).
They were re-recorded with weight decay by role (every projection matrix decays, memory projections included;
embeddings and memory vectors do not). Another x86 CPU reproduced them to 8.3e-8 relative, not bitwise, so the
check is relative 1e-6. The rmt curves were re-recorded with LM-RMT's dropout on the memory in and out. The infinity
curve was re-recorded when the kind became the paper's language model (short-term memory with relative positions,
the CNN gate, the update at read time, the KL regulariser in the loss). The lamemo curve was re-recorded when the
last layer stopped sending the memory positions through its output projection and MLP: fewer dropout draws, so
other masks from there on; with dropout 0 the 20 losses before and after were bitwise equal.

Tiny shape on the bundled corpus (d_model 32, 2 layers, 2 heads, segments of 16, 2 streams, 2 segments per
step), dropout 0.1 so that the RNG path is covered; rmt and memformer with both truncated BPTT and memory replay.
Gradient clipping is set far above the gradient norms of these runs (<= 3), so that it multiplies by exactly 1:
`clip_grad_norm_` sums the per-parameter norms in `model.parameters()` order, and a refactor that moves a
parameter to another module would otherwise change the last bit of the clip coefficient. The curves pin the
model's arithmetic, not the order of its parameter list. Each curve also records a fingerprint of the first training batch, so that a data change (tokenizer, shards) is
told apart from a model change.

Re-record (on one thread, after checking that the change is meant to move the curves):

    MEMSCALE_GOLDEN_RECORD=1 python -m pytest tests/test_golden.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import memscale.train.trainer as trainer_module
from memscale.config import config_from_dict
from memscale.train.trainer import Trainer
from tests.conftest import VOCAB

GOLDEN = Path(__file__).parent / "golden" / "loss_curves.json"
RECORD = os.environ.get("MEMSCALE_GOLDEN_RECORD") == "1"
NUM_STEPS = 20

CASES = {
    "none": ["model.memory.kind=none", "train.memory_grad=detached"],
    "rmt-truncated": ["model.memory.kind=rmt", "train.memory_grad=truncated"],
    "rmt-replay": ["model.memory.kind=rmt", "train.memory_grad=replay"],
    "memformer-truncated": ["model.memory.kind=memformer", "train.memory_grad=truncated"],
    "memformer-replay": ["model.memory.kind=memformer", "train.memory_grad=replay"],
    "xl": ["model.memory.kind=xl", "train.memory_grad=detached"],
    "lamemo": ["model.memory.kind=lamemo", "train.memory_grad=detached"],
    "infinity": ["model.memory.kind=infinity", "train.memory_grad=detached"],
}


def _cfg(data_dir, out_dir, case: str):
    return config_from_dict(
        {},
        [
            "model.d_model=32",
            "model.num_layers=2",
            "model.num_heads=2",
            f"model.vocab_size={VOCAB}",
            "model.dropout=0.1",
            "model.memory.num_tokens=4",
            "model.memory.num_basis=16",
            "model.memory.num_samples=32",
            f"data.dir={data_dir}",
            "data.segment_len=16",
            "data.num_streams=2",
            f"train.max_steps={NUM_STEPS}",
            "train.warmup_steps=5",
            "train.lr=2e-3",
            "train.bptt_segments=2",
            "train.grad_clip=1000",
            "train.eval_every=0",
            "train.log_every=10",
            "train.threads=1",
            f"train.out_dir={out_dir}",
            *CASES[case],
        ],
    )


def _train(data_dir, out_dir, case: str, monkeypatch) -> dict:
    """Per-step window losses (mean token cross-entropy) and a fingerprint of the first batch."""
    losses: list[float] = []
    first: dict[str, int] = {}
    run_window = trainer_module.run_window

    def recording(model, batches, state, **kw):
        if not first:
            first["tokens_sum"] = int(sum(b.tokens_BT.sum() for b in batches))
            first["targets_sum"] = int(sum(b.targets_BT.sum() for b in batches))
        r = run_window(model, batches, state, **kw)
        losses.append(r.loss_sum / r.num_targets)
        return r

    monkeypatch.setattr(trainer_module, "run_window", recording)
    Trainer(_cfg(data_dir, out_dir, case), log=lambda _line: None).train()
    return {"first_batch": first, "losses": losses}


@pytest.mark.parametrize("case", list(CASES))
def test_golden_loss_curve(case, data_dir, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    try:
        got = _train(data_dir, tmp_path / "run", case, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert len(got["losses"]) == NUM_STEPS
    if RECORD:
        curves = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        curves[case] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(curves.items())), indent=1) + "\n")
        pytest.skip(f"recorded {case} into {GOLDEN}")
    expected = json.loads(GOLDEN.read_text())[case]
    assert got["first_batch"] == expected["first_batch"], "the training data changed, not the model"
    # Not bit for bit: the same ops give other last bits on another CPU (another SIMD path in the fp32 matmul and
    # softmax kernels): measured up to 8.3e-8 relative over the 20 steps between the recording machine and another
    # x86 one. 1e-6 is still 1000x below what a changed op gives (a dropout mask, a reordered head, a lost memory
    # read: >= 1e-3 within 20 steps).
    worst = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], expected["losses"], strict=True))
    assert worst < 1e-6, (worst, got["losses"], expected["losses"])
