"""Validation perplexity of every memory kind on the real corpus, at equal shape, segment length and steps.

    memscale bench ppl --config configs/quickstart.yaml                 # all kinds, the config's step budget
    memscale bench ppl --config configs/quickstart.yaml --kinds none,rmt --set train.max_steps=100

Each kind trains from the same seed on the same token stream with the config's settings; kinds whose memory
carries gradient keep the config's `train.memory_grad`, the others train detached (their papers' setting).
"""

from __future__ import annotations

import dataclasses
import tempfile

from memscale.bench import machine_info, now, write_result
from memscale.config import GRAD_CARRYING_KINDS, config_from_dict, load_config
from memscale.train.trainer import Trainer


def main(args) -> int:
    base = load_config(args.config, args.overrides)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    rows = []
    for kind in kinds:
        grad = base.train.memory_grad if kind in GRAD_CARRYING_KINDS else "detached"
        with tempfile.TemporaryDirectory() as out:
            cfg = config_from_dict(
                dataclasses.asdict(base),
                [
                    f"model.memory.kind={kind}",
                    f"train.memory_grad={grad}",
                    f"train.out_dir={out}/run",
                    f"train.eval_every={base.train.max_steps}",
                ],
            )
            print(f"== {kind} (memory_grad={grad})", flush=True)
            s = Trainer(cfg).train()
        rows.append(
            {
                "kind": kind,
                "memory_grad": grad,
                "val_loss": s.val_loss,
                "val_ppl": s.val_ppl,
                "train_loss": s.final_loss,
                "steps": s.steps,
                "tokens_per_s": s.tokens_per_s,
            }
        )
    print(f"{'kind':<10} {'val ppl':>9} {'val loss':>9} {'train loss':>11} {'tok/s':>7}")
    for r in rows:
        print(
            f"{r['kind']:<10} {r['val_ppl']:>9.2f} {r['val_loss']:>9.4f} {r['train_loss']:>11.4f} "
            f"{r['tokens_per_s']:>7.0f}"
        )
    result = {
        "benchmark": "ppl",
        "date": now(),
        "machine": machine_info(),
        "config": dataclasses.asdict(base),
        "rows": rows,
    }
    write_result(result, args.out, "ppl")
    return 0
