"""`python -m tests.dp_fault_entry ARGS`: `memscale ARGS` in which the third window's loss and every gradient are
NaN, on every rank. A fault injected into torchrun's ranks themselves (a driver in the parent process does not
reach them); tests/test_train_parallel.py runs it."""

import math
import sys

import memscale.train.trainer as trainer
from memscale.cli import main

real = trainer.run_window
calls = []


def run_window(model, batches, state, **kw):
    result = real(model, batches, state, **kw)
    calls.append(1)
    if len(calls) == 3:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(math.nan)
        result.loss_sum = math.nan
    return result


trainer.run_window = run_window

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
