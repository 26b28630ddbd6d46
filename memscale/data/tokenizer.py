"""Sentencepiece BPE tokenizer trained on the training split, and a thin wrapper with fixed special ids.

    train_tokenizer("data/prepared/corpus/train.jsonl", "data/prepared/tokenizer.model", vocab_size=16000)
    tok = Tokenizer("data/prepared/tokenizer.model")
    tok.decode(tok.encode(text)) == text   # lossless: identity normalisation, newline piece, byte fallback

Choices, and why:
- The trainer is fed paragraphs, not documents: sentencepiece silently skips any input longer than
  `max_sentence_length`, and a whole book would be dropped without a word (FIELD-NOTES "Data").
- Text round-trips exactly: no NFKC, whitespace kept, "\\n" a piece of its own (the lines of verse and
  dialogue carry meaning), and characters outside the vocabulary fall back to bytes instead of <unk>.
- Fixed ids pad=0, unk=1, bos=2, eos=3, so shards and models agree without reading the model file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from memscale.data.corpus import read_jsonl

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Inputs to the trainer are cut to this many UTF-8 bytes at most.
MAX_SENTENCE_BYTES = 8192


def _pack(parts: list[str], sep: str, max_bytes: int) -> Iterator[str]:
    """Consecutive parts joined with `sep` into pieces of at most `max_bytes`, greedily (a longer part is
    yielded alone, for the caller to cut further)."""
    piece: list[str] = []
    size = 0
    for part in parts:
        n = len(part.encode())
        if piece and size + len(sep) + n > max_bytes:
            yield sep.join(piece)
            piece, size = [], 0
        piece.append(part)
        size += n + (len(sep) if len(piece) > 1 else 0)
    if piece:
        yield sep.join(piece)


def _fit(text: str, max_bytes: int, separators: tuple[str, ...] = ("\n", " ")) -> Iterator[str]:
    """`text` cut at the first separator that yields pieces of at most `max_bytes`; by characters at last."""
    if len(text.encode()) <= max_bytes:
        yield text
    elif not separators:  # a "word" over the limit (a blob, a long URL): characters are 4 bytes at most
        step = max_bytes // 4
        yield from (text[start : start + step] for start in range(0, len(text), step))
    else:
        for piece in _pack(text.split(separators[0]), separators[0], max_bytes):
            yield from _fit(piece, max_bytes, separators[1:])


def iter_paragraphs(text: str, *, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Paragraphs of `text` (blank-line separated), cut at line, then word boundaries to `max_bytes` at most."""
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            yield from _fit(paragraph, max_bytes)


def train_tokenizer(
    corpus_jsonl: str | Path,
    model_path: str | Path,
    *,
    vocab_size: int = 16000,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a BPE model on the documents of `corpus_jsonl` and write it to `model_path`."""
    texts = (doc["text"] for doc in read_jsonl(corpus_jsonl))
    return train_tokenizer_on_texts(
        texts, model_path, vocab_size=vocab_size, num_threads=num_threads, source=str(corpus_jsonl)
    )


def train_tokenizer_on_texts(
    texts: Iterable[str],
    model_path: str | Path,
    *,
    vocab_size: int = 16000,
    num_threads: int | None = None,
    source: str = "the input",
) -> Tokenizer:
    """Train a BPE model on the paragraphs of `texts` and write it to `model_path`; `source` names the corpus
    in the error raised when `vocab_size` does not fit it."""
    paragraphs = (p for text in texts for p in iter_paragraphs(text))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=paragraphs,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=["\n"],
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9999,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size is smaller than required_chars" or "Vocabulary size too high": a user setting.
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the corpus {source} ({reason}): change it"
        ) from None
    Path(model_path).write_bytes(model.getvalue())
    return Tokenizer(model_path)


class Tokenizer:
    """A trained sentencepiece model with memscale's special ids."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} not found: run `memscale data prepare --out DIR`"
            )
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{path} has pad/bos/eos ids {ids}, expected {(PAD_ID, BOS_ID, EOS_ID)}: retrain it"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Iterable[str], *, num_threads: int | None = None) -> list[list[int]]:
        """`encode` of many texts at once, on sentencepiece's own threads."""
        return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as sentencepiece spells it ("\u2581" marks a leading space)."""
        return self._sp.id_to_piece(token_id)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad, bos and eos are control pieces and decode to nothing."""
        return self._sp.decode([int(i) for i in ids])
