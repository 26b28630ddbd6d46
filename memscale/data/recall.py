"""Recall probe: a fact (key -> value) planted early in a long document of real text, asked for at its end.

A probe document is real text from a prepared corpus (the split's documents joined end to end, with an
end-of-document token between them, read from a random offset and wrapped around), with two insertions:

    segment 1                                              ...   last segment
    ~ ~ Remember this: the secret of K is V1 V2. ~ ~ ~ ~   ...   ~ ~ ~ Question: what is the secret of K? Answer: V1 V2
                                                                                                            ^  ^
                                                                        scored: the tokens before V1 and V2 predict them

The key K is one of 64 word pieces, the value two of 64 others (so a guess is right with probability 1/64 per
value token and 1/4096 for both; a tokenizer with fewer whole-word pieces gets fewer, at least MIN_SYMBOLS).
Keys and values are whole-word pieces of the corpus' own tokenizer, so nothing marks the fact as foreign to the text except the sentence around
it. The fact sits at a random offset of the first segment, the question ends the document: the distance between
them is the document's length, and only the memory can bridge it.

Rows and determinism follow the synthetic tasks (memscale/data/synthetic.py): `data.num_streams` examples run
side by side, aligned on segment boundaries; example i is a pure function of (`data.seed`, split, i) and does not
depend on the document length, so the probe of example i at 4K tokens and at 1M tokens has the same key, value,
fact position and text (the longer one reads further). Training reads the train split's text, evaluation the
validation split's, so the text around a fact at evaluation time was never trained on.

Loss and accuracy are only on the value tokens (targets are IGNORE_INDEX elsewhere): the probe trains a model to
recall, not to model the text.
"""

from __future__ import annotations

import numpy as np
import torch

from memscale.config import Config, ConfigError
from memscale.data.batch import IGNORE_INDEX
from memscale.data.synthetic import _SPLITS, NUM_EVAL_EXAMPLES, TaskLoader

MAX_SYMBOLS = 64
"""Keys and values each: up to this many whole-word pieces (fewer with a small tokenizer, at least MIN_SYMBOLS)."""
MIN_SYMBOLS = 8
VALUE_LEN = 2
FACT_TEXT = ("Remember this: the secret of", "is", ".")  # fact = FACT[0] key FACT[1] value FACT[2]
QUESTION_TEXT = ("Question: what is the secret of", "? Answer:")  # question = Q[0] key Q[1] value


class RecallText:
    """The probe's vocabulary (fact template, keys, values) and one split's text, from a prepared data dir."""

    def __init__(self, data_dir: str, split: str):
        from memscale.data.shards import load_split, read_row
        from memscale.data.tokenizer import Tokenizer

        tok = Tokenizer(f"{data_dir}/tokenizer.model")
        self.vocab_size = tok.vocab_size
        words = _word_pieces(tok)
        n = min(MAX_SYMBOLS, len(words) // 2)
        if n < MIN_SYMBOLS:
            raise ConfigError(
                f"{data_dir}/tokenizer.model has {len(words)} whole-word pieces, the recall probe needs "
                f"{2 * MIN_SYMBOLS}: prepare the data with a larger --vocab-size"
            )
        self.keys = np.array(words[:n], dtype=np.int64)
        self.values = np.array(words[n : 2 * n], dtype=np.int64)
        self.fact = [np.array(tok.encode(t), dtype=np.int64) for t in FACT_TEXT]
        self.question = [np.array(tok.encode(t), dtype=np.int64) for t in QUESTION_TEXT]
        self.fact_len = sum(map(len, self.fact)) + 1 + VALUE_LEN
        self.question_len = sum(map(len, self.question)) + 1 + VALUE_LEN

        index = load_split(data_dir, split)
        parts = []
        for row in range(len(index.rows)):
            parts.append(read_row(index, row).astype(np.int64))
            if row + 1 == len(index.rows) or index.rows[row + 1, 0] != index.rows[row, 0]:
                parts.append(np.array([tok.eos_id], dtype=np.int64))
        self.text = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if len(self.text) < 2:
            raise ConfigError(f"{data_dir} has no {split} text for the recall probe: prepare the data again")

    def fact_tokens(self, key: int, value: np.ndarray) -> np.ndarray:
        return np.concatenate([self.fact[0], [key], self.fact[1], value, self.fact[2]])

    def question_tokens(self, key: int, value: np.ndarray) -> np.ndarray:
        return np.concatenate([self.question[0], [key], self.question[1], value])


def _word_pieces(tok) -> list[int]:
    """Ids of pieces that are a whole lowercase word of 3+ letters (a leading "▁" and letters only), by id.

    Low ids are the tokenizer's earliest merges, i.e. its most frequent words, so keys and values are ordinary
    words of the corpus.
    """
    out = []
    for i in range(tok.vocab_size):
        piece = tok.piece(i)
        if piece.startswith("\u2581") and len(piece) >= 4 and piece[1:].isascii() and piece[1:].isalpha():
            if piece[1:].islower():
                out.append(i)
    return out


class RecallExamples:
    """Example i of a split, at any length: its key, value, fact position and text offset, drawn from
    (seed, split, i) alone."""

    def __init__(self, text: RecallText, *, seed: int, split: str, segment_len: int):
        if text.fact_len + text.question_len > segment_len:
            raise ConfigError(
                f"data.segment_len={segment_len} is too short for the recall probe: the fact and the question "
                f"take {text.fact_len + text.question_len} tokens; use data.segment_len >= "
                f"{text.fact_len + text.question_len}"
            )
        self.text = text
        self.segment_len = segment_len
        self._entropy = (seed, _SPLITS[split])

    def draw(self, index: int) -> dict:
        rng = np.random.default_rng((*self._entropy, index))
        t = self.text
        key = int(t.keys[rng.integers(len(t.keys))])
        value = t.values[rng.integers(0, len(t.values), VALUE_LEN)]
        # The fact fits in the first segment before where a one-segment document's question starts, so the
        # same draw serves every document length (task_segments = 1 included).
        fact_at = int(rng.integers(0, self.segment_len - t.fact_len - t.question_len + 1))
        offset = int(rng.integers(len(t.text)))
        return {"key": key, "value": value, "fact_at": fact_at, "offset": offset}

    def filler(self, draws: list[dict], start: int, length: int) -> np.ndarray:
        """[rows, length] text tokens at document positions start .. start + length, fact planted if in range."""
        t, n = self.text, len(self.text.text)
        offsets = np.array([d["offset"] for d in draws])
        out = t.text[(offsets[:, None] + start + np.arange(length)[None, :]) % n]
        for r, d in enumerate(draws):
            fact = t.fact_tokens(d["key"], d["value"])
            lo, hi = d["fact_at"] - start, d["fact_at"] + len(fact) - start
            if hi > 0 and lo < length:
                out[r, max(lo, 0) : min(hi, length)] = fact[max(-lo, 0) : len(fact) - max(hi - length, 0)]
        return out

    def ask(self, draws: list[dict], tokens_RN: np.ndarray) -> np.ndarray:
        """Put each row's question at the end of `tokens_RN` (in place); returns the targets (IGNORE elsewhere)."""
        targets = np.full(tokens_RN.shape, IGNORE_INDEX, dtype=np.int64)
        N = tokens_RN.shape[1]
        for r, d in enumerate(draws):
            q = self.text.question_tokens(d["key"], d["value"])
            tokens_RN[r, N - len(q) :] = q
            targets[r, N - VALUE_LEN - 1 : N - 1] = d["value"]
        return targets


class RecallLoader(TaskLoader):
    """Segment batches of probe documents of `data.task_segments` segments (train: infinite; val: a fixed set),
    with the same stream semantics and state as the synthetic task loaders."""

    def __init__(self, cfg: Config, split: str, *, infinite: bool, text: RecallText | None = None):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(_SPLITS)}")
        d = cfg.data
        if d.task_segments < 1:
            raise ConfigError(f"data.task_segments={d.task_segments} must be >= 1 for the recall probe")
        text = text if text is not None else RecallText(d.dir, split)
        if text.vocab_size != cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer of {d.dir} "
                f"({text.vocab_size}): set model.vocab_size={text.vocab_size}"
            )
        self.examples = RecallExamples(text, seed=d.seed, split=split, segment_len=d.segment_len)
        self.source = "recall"
        self.segment_len = d.segment_len
        self.num_streams = d.num_streams
        self.task_segments = d.task_segments
        self.num_items = VALUE_LEN
        self.chance = 1.0 / len(text.values)
        self.num_groups = None if infinite else -(-NUM_EVAL_EXAMPLES // d.num_streams)
        self._segments = 0

    def _group(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, N = self.num_streams, self.task_segments * self.segment_len
        draws = [self.examples.draw(group * B + r) for r in range(B)]
        tokens = self.examples.filler(draws, 0, N)
        targets = self.examples.ask(draws, tokens)
        return torch.from_numpy(tokens), torch.from_numpy(targets)
