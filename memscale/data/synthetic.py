"""Synthetic memory tasks: copy, reverse and associative retrieval, after RMT (Bulatov et al., 2022, §4).

An example spans `data.task_segments` segments of `data.segment_len` tokens. The information sits in the first
segment, the question and its answer in the last, and every segment between holds only noise. A segment step sees
its own tokens plus whatever the memory carries, so the answer is reachable through memory alone: the `none`
control scores chance, and accuracy above chance measures what the memory kept over the whole example.

One example, T = 8 tokens per segment, 3 segments (S = store marker, A = ask marker, ~ = noise, . = IGNORE_INDEX):

             segment 1: information    | segment 2: filler         | segment 3: question, answer
    copy     S  x1 x2 x3 x4 ~  ~  ~  | ~  ~  ~  ~  ~  ~  ~  ~  | ~  ~  ~  A  x1 x2 x3 x4   tokens
             .  .  .  .  .  .  .  .  | .  .  .  .  .  .  .  .  | .  .  .  x1 x2 x3 x4 .    targets
    reverse  S  x1 x2 x3 x4 ~  ~  ~  | ~  ~  ~  ~  ~  ~  ~  ~  | ~  ~  ~  A  x4 x3 x2 x1   tokens
             .  .  .  .  .  .  .  .  | .  .  .  .  .  .  .  .  | .  .  .  x4 x3 x2 x1 .    targets
    assoc    S  k1 v1 k2 v2 ~  ~  ~  | ~  ~  ~  ~  ~  ~  ~  ~  | ~  ~  ~  A  k2 v2 k1 v1   tokens
             .  .  .  .  .  .  .  .  | .  .  .  .  .  .  .  .  | .  .  .  .  v2 .  v1 .    targets

Targets are ordinary next-token targets (the answer is also fed back as input, teacher forcing), kept only where
the next token is an answer: every answer symbol of copy and reverse, every value of assoc. assoc stores distinct
keys and asks for all of them, in a random order. Symbols and values are drawn uniformly and independently, so an
answer is independent of the answers before it and chance is exactly 1 / `data.task_vocab` per answer.

Information per example, a function of T = `data.segment_len`: half the segment, so that the marker and the
question fit a segment however long, and at most 16 tokens, so that the stored tokens never outnumber the default
16 memory tokens (`model.memory.num_tokens`):

    copy, reverse:  min(T // 2, 16) symbols        (T = 16 -> 8, T = 32 -> 16)
    assoc:          min(T // 4, 8) key-value pairs  (T = 16 -> 4, T = 32 -> 8)

Token ids: 0 pad (reserved and never emitted, so that 0 means the same in every source), 1 store, 2 ask, then
`data.task_vocab` symbols, then NUM_NOISE noise symbols. Noise has a range of its own so that it can never look
like information, and it varies so that the memory must hold its content while unrelated segments keep writing.

Rows: `data.num_streams` examples run side by side, aligned: every row starts an example at the same segment, with
`reset_B` all True there. Example i (row i % num_streams of group i // num_streams) is a pure function of
(`data.seed`, split, i), so a loader's state is the number of segments it has yielded, and `train` and `val` are
different examples of the same task.

Training: the answer's gradient reaches the first segment only if one BPTT window spans the whole example, so set
`train.bptt_segments` = `data.task_segments` (windows then coincide with examples) with `train.memory_grad`
truncated or replay. With shorter windows no gradient teaches the first segment's writes what the question needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from memscale.config import Config, ConfigError
from memscale.data.batch import IGNORE_INDEX, Batch

STORE, ASK = 1, 2  # 0 is the pad id
FIRST_SYMBOL = 3
NUM_NOISE = 8
NUM_EVAL_EXAMPLES = 256
"""Size of a finite (`infinite=False`) set, rounded up to whole groups of `data.num_streams` rows; 256 examples
give at least 256 answers, a standard error of at most ~3 accuracy points."""

_SPLITS = {"train": 0, "val": 1}

# A task draws (information, question, scored) for `n` items over `vocab` symbols (ids from 0): the information
# follows the store marker in the first segment, the question follows the ask marker at the end of the last, and
# `scored` marks the question tokens that are answers (targets of the token before them).
Task = Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _copy(rng: np.random.Generator, n: int, vocab: int):
    x = rng.integers(0, vocab, n)
    return x, x, np.ones(n, dtype=bool)


def _reverse(rng: np.random.Generator, n: int, vocab: int):
    x = rng.integers(0, vocab, n)
    return x, x[::-1], np.ones(n, dtype=bool)


def _assoc(rng: np.random.Generator, n: int, vocab: int):
    keys = rng.choice(vocab, size=n, replace=False)
    values = rng.integers(0, vocab, n)
    order = rng.permutation(n)
    info = np.stack([keys, values], axis=1).ravel()
    question = np.stack([keys[order], values[order]], axis=1).ravel()
    return info, question, np.tile([False, True], n)


_TASKS: dict[str, Task] = {"copy": _copy, "reverse": _reverse, "assoc": _assoc}


def num_items(source: str, segment_len: int) -> int:
    """Symbols (copy, reverse) or key-value pairs (assoc) stored per example; also the answers per example."""
    if source == "assoc":
        return min(segment_len // 4, 8)
    return min(segment_len // 2, 16)


class TaskLoader:
    """Segment batches of a synthetic memory task, infinite (training) or a fixed set (evaluation).

    Iterating continues from where the loader stands (it is a stream, like the corpus loader): a second pass over
    a finite loader yields nothing, so build a new one to read the set again.
    """

    def __init__(self, cfg: Config, split: str, *, infinite: bool):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(_SPLITS)}")
        _check(cfg)
        d = cfg.data
        self.source = d.source
        self.segment_len = d.segment_len
        self.num_streams = d.num_streams
        self.task_segments = d.task_segments
        self.task_vocab = d.task_vocab
        self.num_items = num_items(d.source, d.segment_len)
        self.chance = 1.0 / d.task_vocab
        self.num_groups = None if infinite else -(-NUM_EVAL_EXAMPLES // d.num_streams)
        self._entropy = (d.seed, _SPLITS[split])
        self._segments = 0  # segments yielded so far: the whole state

    @staticmethod
    def required_vocab(cfg: Config) -> int:
        return FIRST_SYMBOL + cfg.data.task_vocab + NUM_NOISE

    def __iter__(self) -> Iterator[Batch]:
        B, T, S = self.num_streams, self.segment_len, self.task_segments
        held_group, tokens_BN, targets_BN = -1, None, None
        while self.num_groups is None or self._segments < self.num_groups * S:
            group, seg = divmod(self._segments, S)
            if group != held_group:
                held_group, (tokens_BN, targets_BN) = group, self._group(group)
            self._segments += 1
            cols = slice(seg * T, (seg + 1) * T)
            yield Batch(
                tokens_BN[:, cols],
                targets_BN[:, cols],
                torch.full((B,), seg == 0),
                torch.full((B,), seg * T, dtype=torch.int64),
            )

    def state_dict(self) -> dict:
        return {"segments": self._segments}

    def load_state_dict(self, state: dict) -> None:
        self._segments = int(state["segments"])

    def _group(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._example(group * self.num_streams + r) for r in range(self.num_streams)]
        return tuple(torch.from_numpy(np.stack(arrays)) for arrays in zip(*rows, strict=True))

    def _example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and targets of example `index`, flat over its task_segments x segment_len positions."""
        rng = np.random.default_rng((*self._entropy, index))
        N = self.task_segments * self.segment_len
        noise_lo = FIRST_SYMBOL + self.task_vocab
        tokens = rng.integers(noise_lo, noise_lo + NUM_NOISE, N)
        targets = np.full(N, IGNORE_INDEX, dtype=np.int64)
        info, question, scored = _TASKS[self.source](rng, self.num_items, self.task_vocab)
        tokens[0] = STORE
        tokens[1 : 1 + len(info)] = FIRST_SYMBOL + info
        ask = N - 1 - len(question)
        tokens[ask] = ASK
        tokens[ask + 1 :] = FIRST_SYMBOL + question
        targets[ask + np.flatnonzero(scored)] = FIRST_SYMBOL + question[scored]
        return tokens, targets


def _check(cfg: Config) -> None:
    d = cfg.data
    if d.source not in _TASKS:
        raise ConfigError(f"data.source={d.source} is not a synthetic task: use one of {', '.join(_TASKS)}")
    if d.task_segments < 2:
        raise ConfigError(
            f"data.task_segments={d.task_segments} must be >= 2: the information and the question need "
            "segments of their own"
        )
    if d.seed < 0:
        raise ConfigError(f"data.seed={d.seed} must be >= 0 for synthetic tasks")
    n = num_items(d.source, d.segment_len)
    if n == 0:
        shortest = 4 if d.source == "assoc" else 2
        raise ConfigError(f"data.segment_len={d.segment_len} is too short for {d.source}: use >= {shortest}")
    if d.task_vocab < 2:
        raise ConfigError(f"data.task_vocab={d.task_vocab} must be >= 2 for the answers to carry information")
    if d.source == "assoc" and d.task_vocab < n:
        raise ConfigError(
            f"data.task_vocab={d.task_vocab} is smaller than the {n} distinct keys assoc stores at "
            f"data.segment_len={d.segment_len}: set data.task_vocab >= {n}"
        )
    need = TaskLoader.required_vocab(cfg)
    if cfg.model.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is too small for data.source={d.source} with "
            f"data.task_vocab={d.task_vocab}: set model.vocab_size >= {need}"
        )
