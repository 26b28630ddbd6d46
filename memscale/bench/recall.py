"""Recall probe per kind: trained on documents of at most --segments segments, asked at up to 1M tokens.

    memscale bench recall                                  # rmt and none, distances 4K .. 1M
    memscale bench recall --kinds rmt,memformer --max-steps 600 --distances 4096,65536,1048576

A fact (key -> value) is planted in the first segment of a document of real text and asked for at its end
(memscale/data/recall.py). Each kind is trained on probe documents with a curriculum over the number of segments
(1, 2, 4, ..., --segments; the next stage starts at --advance-at validation accuracy or when the stage's share of
--max-steps is spent; in stage 1 fact and question share a segment, so the model first learns to find the fact),
with the loss on the value tokens only and the last stage's final --cooldown share of the steps annealing the
learning rate toward zero (measured: armt's exact match at 1M tokens went from 0.81 at a constant rate to 0.98).
It is then scored on held-out documents (validation text) at every distance by one streaming pass per group of
rows (memscale/eval/recall.py). Kinds whose memory carries gradient (rmt, memformer, armt) train with BPTT through
the whole document; the others carry memory detached, as in their papers.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml

from memscale.bench import machine_info, now, write_result
from memscale.bench.tasks import curriculum
from memscale.config import GRAD_CARRYING_KINDS, Config, config_from_dict
from memscale.data.recall import RecallLoader, RecallText
from memscale.eval.recall import evaluate_recall, parse_distances
from memscale.eval.tasks import evaluate_task
from memscale.models import MemoryTransformer
from memscale.train.bptt import run_window
from memscale.train.optim import build_optimizer

RECALL_SHAPE = [
    "model.d_model=128",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.memory.num_tokens=16",
    # 128-token segments: 1M tokens is 8192 memory updates. Measured: at 512 tokens (16 streams) rmt was still at
    # chance after 275 steps of the first stage, at 128 tokens (32 streams) it retrieved within 150.
    "data.segment_len=128",
    "data.num_streams=32",
    "train.lr=1e-3",
    "train.weight_decay=0.0",
    "train.beta2=0.999",
]
DISTANCES = [4096, 16384, 65536, 262144, 1048576]
STAGE_EVAL_EXAMPLES = 64


def recall_config(kind: str, segments: int, data_dir: str, vocab: int, overrides: list[str]) -> Config:
    grad = "truncated" if kind in GRAD_CARRYING_KINDS else "detached"
    return config_from_dict(
        {},
        [
            *RECALL_SHAPE,
            f"data.dir={data_dir}",
            "data.source=recall",
            f"model.vocab_size={vocab}",
            f"model.memory.kind={kind}",
            f"data.task_segments={segments}",
            f"train.bptt_segments={segments}",
            f"train.memory_grad={grad}",
            *overrides,
        ],
    )


def train_recall(
    kind: str,
    *,
    segments: int,
    max_steps: int,
    advance_at: float,
    eval_every: int,
    data_dir: str,
    overrides: list[str],
    texts: dict[str, RecallText],
    mixed_lengths: bool = True,
    memory_noise: float = 0.0,
    stationarity: float = 0.0,
    carry_reset: float | None = None,
    cooldown: float = 0.0,
    seed: int = 0,
    log=print,
) -> tuple[MemoryTransformer, dict]:
    vocab = texts["train"].vocab_size
    cfg = recall_config(kind, segments, data_dir, vocab, overrides)
    torch.manual_seed(seed)
    model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
    opt = build_optimizer(model, cfg.train)
    # Stage 1 puts the fact and its question in one segment: attention alone retrieves it, which teaches the
    # model to find the fact before it has to learn to carry it through memory.
    stages = [1, *curriculum(segments)] if segments > 1 else [1]
    per_stage = max_steps // len(stages)
    steps, t0, history = 0, time.perf_counter(), []
    draw = torch.Generator().manual_seed(seed)
    # `carry_reset`: documents follow each other in a stream and a row's memory is reset at a document start
    # only with this probability, so the model meets memory of every age (earlier facts included) and must
    # replace a held fact when a new one comes and hold it through text otherwise. BPTT stays within the
    # document (at most `segments` segments); the incoming memory is a constant. Measured: carried into stage 1,
    # old facts in memory kept rmt at chance through the stage's 500 steps (without, it leaves chance
    # after ~200).
    carried = None
    for n in stages:
        stage_cfg = recall_config(kind, n, data_dir, vocab, overrides)
        # Documents of every length up to the stage's: a question may come after any number of segments, so the
        # memory must hold the fact at every step rather than at one fixed depth (measured: trained at a fixed
        # 8 segments, rmt recalled 0.94 at 8 segments and 0.00 at 32).
        loaders = {
            k: iter(
                RecallLoader(
                    recall_config(kind, k, data_dir, vocab, overrides),
                    "train",
                    infinite=True,
                    text=texts["train"],
                )
            )
            for k in (range(1, n + 1) if mixed_lengths else [n])
        }
        lengths = list(loaders)
        budget = max_steps - steps if n == stages[-1] else per_stage
        decay = min(budget, round(cooldown * max_steps)) if n == stages[-1] else 0
        for i in range(budget):
            for group in opt.param_groups:
                group["lr"] = cooldown_lr(stage_cfg.train.lr, i, budget, decay)
            k = lengths[int(torch.randint(len(lengths), (1,), generator=draw))]
            opt.zero_grad(set_to_none=True)
            window = [next(loaders[k]) for _ in range(k)]
            state = None
            # Stage 1 (fact and question in one segment) has no use for carried memory.
            if carry_reset is not None and n > 1:
                B = window[0].tokens_BT.shape[0]
                state = carried if carried is not None else model.init_state(B)
                reset = torch.rand(B, generator=draw) < carry_reset
                window[0] = dataclasses.replace(window[0], reset_B=reset)
            out = _train_window(model, window, stage_cfg.train.memory_grad, memory_noise, stationarity, state)
            carried = out.state
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage_cfg.train.grad_clip)
            opt.step()
            steps += 1
            if (i + 1) % eval_every == 0 or i + 1 == budget:
                val = RecallLoader(stage_cfg, "val", infinite=False, text=texts["val"])
                acc = evaluate_task(model, val, num_examples=STAGE_EVAL_EXAMPLES).accuracy
                loss = out.loss_sum / max(out.num_targets, 1)
                history.append({"step": steps, "segments": n, "accuracy": acc, "loss": loss})
                log(
                    f"  {kind:<9} segments {n:>2} step {steps:>5}: train loss {loss:.3f} | "
                    f"val accuracy at {n} segments {acc:.3f} ({time.perf_counter() - t0:.0f}s)"
                )
                if acc >= advance_at and n != stages[-1]:
                    break
    return model, {
        "steps": steps,
        "train_seconds": time.perf_counter() - t0,
        "cooldown_steps": decay,
        "history": history,
    }


def cooldown_lr(lr: float, i: int, budget: int, decay: int) -> float:
    """The rate of step `i` of a stage of `budget` steps whose last `decay` steps anneal linearly toward zero.

    The probe otherwise trains at a constant rate, because the curriculum does not know in advance when a stage
    ends; the last stage's length is known when it starts, so its tail can anneal (warmup-stable-decay, as in
    MiniCPM, arXiv 2404.06395). Step `budget - decay` runs at `lr`, the last at `lr / decay`.
    """
    left = budget - i
    return lr if left > decay else lr * left / decay


def _train_window(
    model: MemoryTransformer,
    window: list,
    memory_grad: str,
    memory_noise: float,
    stationarity: float,
    state=None,
):
    """Forward and backward over one whole document, from `state` (default: the initial memory)."""
    if state is None:
        state = model.init_state(window[0].tokens_BT.shape[0])
    if not memory_noise and not stationarity:
        return run_window(model, window, state, memory_grad=memory_grad)
    # As `run_window` (truncated/detached), plus two optional regularisers of the carried memory tokens/slots:
    #  - Gaussian noise between segments (`memory_noise`);
    #  - a stationarity penalty (`stationarity`): the relative squared change of the memory across each segment
    #    that holds only text (after the fact's segment, before the question's), so that once written the fact
    #    is held as a fixed point of the update rather than in a code that moves with every segment. Measured
    #    without it: rmt trained on <= 8 segments recalls 0.94 at 8, 0.61 at 12, 0.17 at 16 and 0.00 at 24
    #    segments, while memories of documents that differ only in the value stay as far apart as at the start:
    #    the fact is still there, the readout just no longer decodes where the code has moved to.
    from memscale.train.bptt import WindowResult

    total = sum(b.num_targets for b in window)
    state = (
        state.detach()
    )  # as run_window: a window's incoming state is a constant (a reset row restarts anyway)
    losses, auxes, drift = [], [], []
    for i, b in enumerate(window):
        out = model.step(b.tokens_BT, state, targets_BT=b.targets_BT, reset_B=b.reset_B, return_logits=False)
        new = out.state if memory_grad != "detached" else out.state.detach()
        if stationarity and "mem" in new and 1 <= i < len(window) - 1:
            prev, cur = state["mem"], new["mem"]
            drift.append((cur - prev).pow(2).sum((1, 2)) / prev.detach().pow(2).sum((1, 2)))
        state = new
        if memory_noise and "mem" in state:
            state.tensors["mem"] = state["mem"] + memory_noise * torch.randn_like(state["mem"])
        losses.append(out.loss_sum)
        if out.aux_sum is not None:
            auxes.append(out.aux_sum)
    loss = torch.stack(losses).sum()
    aux = torch.stack(auxes).sum() if auxes else None
    objective = (loss if aux is None else loss + aux) / max(total, 1)
    if drift:
        objective = objective + stationarity * torch.stack(drift).mean()
    if objective.requires_grad:
        objective.backward()
    return WindowResult(loss.item(), total, state.detach(), 0.0 if aux is None else aux.item())


def _load(run_dir: str, cfg: Config) -> tuple[MemoryTransformer, dict, Path]:
    """A model kept by `--save`, with its training record; its model config must be this run's."""
    from memscale.checkpoint import simple as ckpt
    from memscale.config import ConfigError, model_architecture

    path = ckpt.latest(f"{run_dir}/checkpoints")
    if path is None:
        raise ConfigError(
            f"--load: no checkpoint under {run_dir}/checkpoints: run `bench recall --save` first"
        )
    ts = ckpt.load(path)
    if model_architecture(ts.config["model"]) != model_architecture(cfg.model):
        raise ConfigError(
            f"--load: the model in {path} differs from this run's shape: pass the same --set keys"
        )
    model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len)
    model.load_state_dict(ts.model)
    print(f"  loaded {path}")
    return model, ts.extra.get("trained", {"steps": ts.step}), path


def _save(model: MemoryTransformer, cfg: Config, trained: dict, out_dir: str):
    """The trained probe model as an ordinary checkpoint, so `memscale eval --checkpoint` can ask it again."""
    from memscale.checkpoint import simple as ckpt
    from memscale.config import to_dict

    ts = ckpt.TrainState(
        step=trained["steps"],
        model=model.state_dict(),
        optimizer={},
        scheduler={},
        loader={},
        memory={},
        rng=ckpt.rng_state(),
        config=to_dict(cfg),
        extra={"source": "bench-recall", "trained": trained},
    )
    path = ckpt.save(f"{out_dir}/checkpoints", ts, keep=1)
    Path(out_dir, "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(
        f"  saved {path}; ask it again: memscale eval {out_dir}/config.yaml --checkpoint {out_dir} --distances ..."
    )
    return path


def format_table(result: dict) -> str:
    distances = result["distances"]
    head = f"{'kind':<10} {'steps':>6}" + "".join(f" {_label(d):>7}" for d in distances)
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        acc = {a["distance"]: a["exact_match"] for a in row["recall"]}
        lines.append(f"{row['kind']:<10} {row['steps']:>6}" + "".join(f" {acc[d]:>7.3f}" for d in distances))
    lines.append(
        f"exact match of the {result['value_len']}-token value, {result['num_examples']} held-out documents per "
        f"distance; trained on <= {result['segments']} segments of {result['segment_len']} tokens; chance "
        f"{result['chance_exact']:.1e}"
    )
    return "\n".join(lines)


def _label(tokens: int) -> str:
    if tokens % 1048576 == 0:
        return f"{tokens // 1048576}M"
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def main(args) -> int:
    from memscale.data.recall import VALUE_LEN

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    texts = {split: RecallText(args.data_dir, split) for split in ("train", "val")}
    shape = recall_config(kinds[0], args.segments, args.data_dir, texts["train"].vocab_size, args.overrides)
    distances = parse_distances(args.distances, shape.data.segment_len)
    if args.threads:
        torch.set_num_threads(args.threads)
    # How the models are trained: passed to train_recall and recorded in the result as it is.
    recipe = {
        "max_steps": args.max_steps,
        "advance_at": args.advance_at,
        "mixed_lengths": not args.fixed_lengths,
        "memory_noise": args.memory_noise,
        "stationarity": args.stationarity,
        "carry_reset": args.carry_reset,
        "cooldown": args.cooldown,
        "seed": args.seed,
    }
    rows = []
    for kind in kinds:
        cfg = recall_config(kind, args.segments, args.data_dir, texts["val"].vocab_size, args.overrides)
        if args.load:
            model, trained, saved = _load(f"{args.load}/recall-{kind}", cfg)
        else:
            model, trained = train_recall(
                kind,
                segments=args.segments,
                eval_every=args.eval_every,
                data_dir=args.data_dir,
                overrides=args.overrides,
                texts=texts,
                **recipe,
            )
            saved = _save(model, cfg, trained, f"{args.out}/recall-{kind}") if args.save else None
        val = RecallLoader(cfg, "val", infinite=False, text=texts["val"])
        t0 = time.perf_counter()
        recall = evaluate_recall(
            model,
            val.examples,
            distances=distances,
            num_examples=args.examples,
            num_streams=args.eval_streams,
            log=print,
        )
        for r in recall:
            print(
                f"  {kind:<9} distance {r.distance:>8}: exact match {r.exact_match:.3f} | accuracy {r.accuracy:.3f}"
            )
        rows.append(
            {
                "kind": kind,
                **trained,
                "eval_seconds": time.perf_counter() - t0,
                "checkpoint": str(saved) if saved else None,
                "recall": [dataclasses.asdict(r) for r in recall],
            }
        )
    result = {
        "benchmark": "recall",
        "date": now(),
        "machine": machine_info(),
        "segments": args.segments,
        "segment_len": shape.data.segment_len,
        "distances": distances,
        "num_examples": rows[0]["recall"][0]["num_examples"] if rows else 0,
        "value_len": VALUE_LEN,
        "chance_token": 1.0 / len(texts["val"].values),
        "chance_exact": 1.0 / len(texts["val"].values) ** VALUE_LEN,
        "data_dir": args.data_dir,
        # How the models were trained, so that a variant's row can be told from the default's.
        "training": {**recipe, "overrides": args.overrides, "loaded_from": args.load},
        "config": dataclasses.asdict(shape.model),
        "rows": rows,
    }
    print(format_table(result))
    write_result(result, args.out, "recall")
    return 0
