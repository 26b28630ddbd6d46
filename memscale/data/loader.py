"""Streaming loader: whole documents packed into B parallel streams and cut into segments of T tokens.

Legend: B streams (rows), T segment tokens.

    loader = StreamLoader("data/prepared/bundled", "train", segment_len=512, num_streams=4)
    for batch in loader: ...        # a memscale.data.batch.Batch per segment step
    state = loader.state_dict()     # JSON-able: a new loader + load_state_dict(state) continues exactly

Each row of a batch is a stream that reads documents back to back. A document always starts at a segment
boundary, with `reset_B` True for its row at that step (the row's memory is reset there); its last segment is
padded with the pad id and IGNORE_INDEX targets, so that no segment mixes two documents. Targets are the next
token of the same document: a document of L tokens ([bos] ... [eos]) gives L - 1 predictions in
ceil((L - 1) / T) segments.

How the work is divided, deterministically:
- streams: the run has G = num_streams x world_size *global* streams. Epoch e shuffles all documents with
  (seed, e); a stream that finishes its document takes the next one of that order (lowest stream first);
- ranks: data-parallel rank r owns global streams [r B, (r + 1) B) and reads only their chunks. Every rank runs
  the same plan over all G streams (bookkeeping over the index, no token data), so every document is read exactly
  once per epoch across ranks, and the position (`state_dict`) is the same on every rank and free of the rank
  layout: a run saved on 2 ranks of B streams resumes on 1 rank of 2B streams, or 4 of B/2, and reads the same
  tokens in the same global rows;
- workers: which chunk each stream needs at each step follows from the document lengths in the index alone, so
  the plan runs in this process and worker processes only read and decode the chunks it asks for. A torch
  DataLoader over a map-style dataset returns items in the order of its sampler, whatever the number of
  workers, so the batches and the saved position do not depend on num_workers (a run may resume with another).

Documents of any length are read chunk by chunk (see shards.py): a stream holds only the chunks that overlap
its current segment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from memscale.data.batch import IGNORE_INDEX, Batch
from memscale.data.shards import SplitIndex, load_split, read_row

STATE_VERSION = 2
# The settings that fix the sequence of batches: a saved position is only valid for a loader that shares them.
# The rank layout is not among them (see the module docstring).
_STATE_SETTINGS = ("split", "data", "global_streams", "segment_len", "seed", "infinite")

Row = tuple[int, int]  # (document, position in it of the row's first input token)
Fetch = tuple[int, int, int]  # (stream, chunk of the stream's document, index row)


class _Plan:
    """Which document and position each stream is at, step after step, and which chunks to read for it.

    Bookkeeping over the index only, never token data: the sampler that feeds the workers and the packer that
    builds batches each run a copy from the same state, and agree on every step.
    """

    def __init__(self, index: SplitIndex, *, settings: dict, state: dict):
        self._index = index
        self._segment_len = settings["segment_len"]
        self._seed, self._infinite = settings["seed"], settings["infinite"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.streams: list[list[int] | None] = [list(s) if s is not None else None for s in state["streams"]]
        # The last chunk read so far of each stream's document; -1: none (also after a resume: read it again).
        self._have = [-1] * len(self.streams)
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._index.num_docs)

    def _next_doc(self) -> int | None:
        while self.cursor >= len(self._order):
            if not self._infinite:
                return None
            assert len(self._order) > 0, "StreamLoader checks that the split has documents when infinite"
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        self.cursor += 1
        return int(self._order[self.cursor - 1])

    def step(self) -> tuple[list[Row | None], list[Fetch]] | None:
        """The rows of the next segment step (None: a dry stream) and the chunks to read before it, in reading
        order; None once every stream is dry."""
        T, C = self._segment_len, self._index.chunk_tokens
        rows: list[Row | None] = []
        fetches: list[Fetch] = []
        for s, current in enumerate(self.streams):
            if current is None:
                doc = self._next_doc()
                if doc is None:
                    rows.append(None)
                    continue
                current = self.streams[s] = [doc, 0]
                self._have[s] = -1
            doc, pos = current
            num_tokens = int(self._index.doc_tokens[doc])
            end = min(pos + T + 1, num_tokens)  # inputs pos .. pos+T-1 and their targets, up to pos+T
            last_chunk = (end - 1) // C
            for chunk in range(max(pos // C, self._have[s] + 1), last_chunk + 1):
                fetches.append((s, chunk, int(self._index.first_row[doc]) + chunk))
            self._have[s] = last_chunk
            rows.append((doc, pos))
            current[1] = pos + T
            if current[1] >= num_tokens - 1:  # every token that has a successor has been an input
                self.streams[s] = None
        if all(row is None for row in rows):
            return None
        return rows, fetches

    def state(self) -> dict:
        streams = [list(s) if s is not None else None for s in self.streams]
        return {"epoch": self.epoch, "cursor": self.cursor, "streams": streams}


class _ChunkDataset(Dataset):
    """Index row -> token ids of that chunk: all that runs in worker processes."""

    def __init__(self, index: SplitIndex):
        self._index = index

    def __len__(self) -> int:
        return len(self._index.rows)

    def __getitem__(self, row: int) -> np.ndarray:
        return read_row(self._index, row)


class _ChunkRequests:
    """Sampler: the index rows that the plan needs, in the order in which the packer consumes them."""

    def __init__(self, index: SplitIndex, settings: dict, state: dict, streams: range):
        self._index, self._settings, self._state, self._streams = index, settings, state, streams

    def __iter__(self) -> Iterator[int]:
        plan = _Plan(self._index, settings=self._settings, state=self._state)
        while (step := plan.step()) is not None:
            for stream, _, row in step[1]:
                if stream in self._streams:
                    yield row


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGUSR1 to the training process, which finishes its step and checkpoints
    (a cluster scheduler signals every process of a job; a worker killed by it would fail the step first)."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def _identity(item: np.ndarray) -> np.ndarray:
    # The DataLoader's default conversion would make tensors of the arrays; the packer slices them as numpy.
    return item


class StreamLoader:
    """Batches of `num_streams` document streams, a segment of `segment_len` tokens per step.

    `infinite=True` (training) runs epoch after epoch, reshuffling documents with (seed, epoch).
    `infinite=False` (validation) reads each document of this rank once and stops when every stream is dry;
    `take(n)` gives exactly n batches (dry ones past the end), so that all ranks of a data-parallel evaluation
    run the same steps. Iteration continues from the loader's position: build a new loader per evaluation.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        *,
        segment_len: int,
        num_streams: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        infinite: bool = True,
    ):
        if segment_len < 1 or num_streams < 1:
            raise ValueError(f"segment_len={segment_len} and num_streams={num_streams} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self._index = load_split(data_dir, split)
        if infinite and self._index.num_docs < 1:
            raise ValueError(f"split '{split}' of {data_dir} has no documents: prepare more data")
        self.num_workers = num_workers
        self._streams = range(rank * num_streams, (rank + 1) * num_streams)  # this rank's global streams
        self._settings = {
            "split": split,
            "data": self._index.fingerprint,
            "global_streams": num_streams * world_size,
            "segment_len": segment_len,
            "seed": seed,
            "infinite": infinite,
        }
        self._state = {"epoch": 0, "cursor": 0, "streams": [None] * (num_streams * world_size)}
        self._steps = 0

    @property
    def epoch(self) -> int:
        """The epoch of the most recently started document (of any rank: the plan is global)."""
        return self._state["epoch"]

    @property
    def steps(self) -> int:
        """Batches yielded so far, including those before a resume."""
        return self._steps

    def __iter__(self) -> Iterator[Batch]:
        plan = _Plan(self._index, settings=self._settings, state=self._state)
        chunks = self._chunks()
        lo, hi = self._streams.start, self._streams.stop
        buffers: list[dict[int, np.ndarray]] = [{} for _ in self._streams]
        while (step := plan.step()) is not None:
            rows, fetches = step
            for stream, chunk, _ in fetches:
                if lo <= stream < hi:
                    buffers[stream - lo][chunk] = next(chunks)
            batch = self._pack(rows[lo:hi], buffers)
            self._state = plan.state()
            self._steps += 1
            yield batch

    def take(self, num_steps: int) -> Iterator[Batch]:
        """Exactly `num_steps` batches from the current position; past the end of a finite split, dry ones."""
        batches = iter(self)
        for _ in range(num_steps):
            # One next() per step: pulling a batch beyond num_steps would move the saved position past it.
            batch = next(batches, None)
            yield batch if batch is not None else self._pack([None] * len(self._streams), [])

    def _chunks(self) -> Iterator[np.ndarray]:
        dataset = _ChunkDataset(self._index)
        requests = _ChunkRequests(self._index, self._settings, self._state, self._streams)
        if self.num_workers == 0:
            return (dataset[row] for row in requests)
        loader = DataLoader(
            dataset,
            sampler=requests,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_ignore_stop_signals,
        )
        return iter(loader)

    def _pack(self, rows: list[Row | None], buffers: list[dict[int, np.ndarray]]) -> Batch:
        T, C = self._settings["segment_len"], self._index.chunk_tokens
        B = len(rows)
        tokens_BT = np.full((B, T), self._index.pad_id, dtype=np.int64)
        targets_BT = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        reset_B = np.zeros(B, dtype=bool)
        doc_pos_B = np.zeros(B, dtype=np.int64)
        for b, row in enumerate(rows):
            if row is None:
                continue
            doc, pos = row
            num_tokens = int(self._index.doc_tokens[doc])
            end = min(pos + T + 1, num_tokens)
            chunks = range(pos // C, (end - 1) // C + 1)
            window = np.concatenate([buffers[b][k][max(pos - k * C, 0) : end - k * C] for k in chunks])
            tokens_BT[b, : len(window) - 1] = window[:-1]
            targets_BT[b, : len(window) - 1] = window[1:]
            reset_B[b] = pos == 0
            doc_pos_B[b] = pos
            if end == num_tokens:
                buffers[b].clear()  # the document ends in this segment
            for k in [k for k in buffers[b] if k < (pos + T) // C]:
                del buffers[b][k]  # chunks that the stream's next segment no longer overlaps
        tensors = (tokens_BT, targets_BT, reset_B, doc_pos_B)
        return Batch(*(torch.from_numpy(t) for t in tensors))

    def state_dict(self) -> dict:
        """The position after the last yielded batch, with the settings it is valid for (small, JSON-able)."""
        return {"version": STATE_VERSION, **self._settings, **self._state, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}: the position was saved by "
                "another memscale version and cannot be continued; start a new run"
            )
        if state.get("global_streams") != self._settings["global_streams"]:
            raise ValueError(
                f"the saved position has {state.get('global_streams')} streams in all, this run "
                f"{self._settings['global_streams']} (data.num_streams x data-parallel ranks): keep the product, "
                "e.g. twice the ranks with half the streams each"
            )
        for key in _STATE_SETTINGS:
            if state.get(key) != self._settings[key]:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has "
                    f"{key}={self._settings[key]!r}: resume with the same data and loader settings"
                )
        self._state = {"epoch": state["epoch"], "cursor": state["cursor"], "streams": state["streams"]}
        self._steps = state["steps"]
