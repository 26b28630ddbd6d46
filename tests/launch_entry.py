"""A trivial entry point for the launcher test: `python -m tests.launch_entry OUT_DIR EXIT_RANK EXIT_CODE`.

Each rank joins the default group (gloo), all-reduces its rank, writes what it saw to OUT_DIR/rank<R>.txt, and rank
EXIT_RANK exits with EXIT_CODE (-1: nobody fails).
"""

import sys
from pathlib import Path

from memscale.parallel.launch import dist_env

if __name__ == "__main__":
    out_dir, exit_rank, exit_code = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    env = dist_env()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(env.rank)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    (out_dir / f"rank{env.rank}.txt").write_text(
        f"{env.rank} {env.world_size} {env.local_rank} {env.launched} {t.item()}"
    )
    if env.rank == exit_rank:
        sys.exit(exit_code)
