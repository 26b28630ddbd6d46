import os

import torch

# Two CPU cores are shared by the test processes; one intra-op thread per test keeps timings stable.
torch.set_num_threads(max(1, int(os.environ.get("MEMSCALE_TEST_THREADS", "1"))))
