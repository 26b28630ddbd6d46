"""The parallel runtime (DESIGN.md §3). Nothing heavy is imported here: import the module you need.

dims.py       ParallelDims (validated tp/pp/dp/ZeRO layout), init_distributed -> ParallelGroups
cpu_shims.py  megatron-core's CUDA assumptions redirected to the CPU (applied by init_distributed on CPU)
random.py     TP-aware seeding; RNG snapshots (and RNGBank) that include megatron-core's tracker streams
zero.py       DeepSpeed ZeRO 0-3 over the dp group: derived config, mpu adapter, ZeroEngine
launch.py     spawn_local (torchrun for `--nproc`), dist_env (RANK/WORLD_SIZE/LOCAL_RANK)
pipeline/     schedules over segments as data (schedule.py) and their checker and cost simulator (simulate.py)
"""
