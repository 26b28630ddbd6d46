"""Choosing the segment stream for a run from `data.source`: the token shards of a prepared corpus, or a
synthetic memory task. Every source yields `Batch`es and has `state_dict()` / `load_state_dict()`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from memscale.config import Config, ConfigError, DataConfig


def _meta(data: DataConfig) -> dict:
    path = Path(data.dir) / "meta.json"
    if not Path(data.dir).is_dir():
        raise ConfigError(
            f"data.dir={data.dir} does not exist: run `memscale data prepare --source bundled --out {data.dir}` first"
        )
    if not path.exists():
        raise ConfigError(
            f"data.dir={data.dir} has no meta.json: run `memscale data prepare --out {data.dir}` again"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(
            f"{path} is not valid JSON: run `memscale data prepare --out {data.dir}` again"
        ) from None


def data_vocab_size(data: DataConfig) -> int | None:
    """The tokenizer's vocabulary for corpus data and the recall probe; None for synthetic tasks (their vocabulary
    is the config's)."""
    if data.source not in ("corpus", "recall"):
        return None
    return int(_meta(data)["vocab_size"])


def unigram_logp(data: DataConfig) -> torch.Tensor | None:
    """Log-probabilities of the train split's token frequencies (add-one smoothed), for the unigram baseline.

    None for synthetic tasks. Reads every train token once (~1 s for 10M tokens).
    """
    if data.source != "corpus":
        return None
    from memscale.data.shards import load_split, read_row

    vocab = data_vocab_size(data)
    index = load_split(data.dir, "train")
    counts = np.ones(vocab, dtype=np.int64)
    for row in range(len(index.rows)):
        ids = read_row(index, row)
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def build_loader(cfg: Config, split: str, *, infinite: bool, rank: int = 0, world_size: int = 1):
    """The segment stream of `split`; under data parallelism, `rank`'s slice of the global streams."""
    d = cfg.data
    if world_size > 1 and d.source != "corpus":
        raise ConfigError(
            f"data.source={d.source} runs on one process: use data.source=corpus with parallel.dp > 1"
        )
    if d.source == "corpus":
        from memscale.data.loader import StreamLoader

        _meta(d)
        return StreamLoader(
            d.dir,
            split,
            segment_len=d.segment_len,
            num_streams=d.num_streams,
            num_workers=d.num_workers,
            seed=d.seed,
            infinite=infinite,
            rank=rank,
            world_size=world_size,
        )
    if d.source == "recall":
        from memscale.data.recall import RecallLoader

        _meta(d)
        return RecallLoader(cfg, split, infinite=infinite)
    from memscale.data.synthetic import TaskLoader

    return TaskLoader(cfg, split, infinite=infinite)
