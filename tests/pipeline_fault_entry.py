"""`python -m tests.pipeline_fault_entry ARGS`: `memscale ARGS` in which the third pipeline window's loss and every
gradient are NaN and stream 1's memory is NaN after it, on every stage. A fault injected into torchrun's ranks
themselves (a driver in the parent process does not reach them); tests/test_train_pipeline.py runs it."""

import math
import sys

import memscale.train.pipeline as pipeline
from memscale.cli import main
from memscale.models.memory.base import MemoryState

real = pipeline.StagePipeline.train_step
calls = []


def train_step(self, batches, state, **kw):
    result, new = real(self, batches, state, **kw)
    calls.append(1)
    if len(calls) == 3:
        for p in self.stage.parameters():
            if p.grad is not None:
                p.grad.fill_(math.nan)
        result.loss_sum = math.nan
        poisoned = {n: t.clone() for n, t in new.items()}
        for t in poisoned.values():
            if t.is_floating_point():
                t[1] = math.nan
        new = MemoryState(poisoned)
    return result, new


pipeline.StagePipeline.train_step = train_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
