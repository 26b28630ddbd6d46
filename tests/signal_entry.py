"""An entry point for the launcher's signal test: `python -m tests.signal_entry OUT_DIR`.

Each rank writes OUT_DIR/ready<R>, then waits; SIGTERM or SIGUSR1 makes it write the signal's name to
OUT_DIR/rank<R>.sig and exit 75, as `memscale train` does after its checkpoint. No torch: it starts in a blink.
"""

import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    out_dir, rank = Path(sys.argv[1]), os.environ["RANK"]

    def stop(signum, _frame):
        (out_dir / f"rank{rank}.sig").write_text(signal.Signals(signum).name)
        sys.exit(75)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, stop)
    (out_dir / f"ready{rank}").write_text("")
    time.sleep(60)
    sys.exit(1)  # no signal came
