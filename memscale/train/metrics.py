"""Where training numbers go: TensorBoard scalars and one progress line per log interval."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes scalars to TensorBoard under `<out_dir>/tb` and prints progress lines to stdout."""

    def __init__(self, out_dir: str | Path, *, stream=None):
        # Imported here: tensorboard pulls in a few hundred ms of imports that `memscale --help` should not pay.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def progress(
        self,
        *,
        step: int,
        max_steps: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        mfu: float,
        step_seconds: float,
        skipped: int = 0,
    ) -> None:
        eta = (max_steps - step) * step_seconds
        self.line(
            f"step {step:>6}/{max_steps} | loss {loss:7.4f} | lr {lr:.2e} | grad {grad_norm:6.3f} | "
            f"{tokens_per_s:8.0f} tok/s | mfu {mfu:5.3f} | eta {format_duration(eta)}"
            + (f" | skipped {skipped}" if skipped else "")
        )

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
