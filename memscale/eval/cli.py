"""`memscale eval`: score a checkpoint on held-out data."""

from __future__ import annotations

from pathlib import Path

import torch

from memscale.checkpoint import simple as ckpt
from memscale.config import ConfigError, config_from_dict, load_config, model_architecture
from memscale.data.sources import build_loader, unigram_logp
from memscale.eval.evaluate import evaluate_lm
from memscale.models import MemoryTransformer


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        return p
    for root in (p, p / "checkpoints"):
        found = ckpt.latest(root) if root.is_dir() else None
        if found is not None:
            return found
    raise ConfigError(
        f"--checkpoint {path}: no checkpoint there; pass a run's out_dir or a step-NNNNNN directory"
    )


def load_model(path: Path, *, device: str = "cpu") -> tuple[MemoryTransformer, dict]:
    ts = ckpt.load(path)
    try:
        saved = config_from_dict({k: ts.config.get(k, {}) for k in ("model", "data")})
    except ConfigError as e:
        raise ConfigError(f"{path / 'trainer.json'}: its config does not load ({e})") from None
    model = MemoryTransformer(saved.model, segment_len=saved.data.segment_len)
    ckpt.load_weights(model, path, ts.model)
    return model.to(device).eval(), ts.config


def run_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    path = resolve_checkpoint(args.checkpoint)
    model, saved = load_model(path, device=cfg.train.device)
    if model_architecture(saved["model"]) != model_architecture(cfg.model):
        raise ConfigError(
            f"model.* in {args.config} differs from the checkpoint {path}: use the training config"
        )
    loader = build_loader(cfg, "val", infinite=False)
    torch.manual_seed(cfg.train.seed)
    if cfg.data.source == "corpus":
        ev = evaluate_lm(
            model,
            loader,
            num_segments=args.segments,
            num_streams=cfg.data.num_streams,
            device=cfg.train.device,
            buckets=(4096, 32768, 262144, 1048576),
            unigram_logp=unigram_logp(cfg.data),
        )
        print(f"checkpoint {path}")
        print(
            f"validation: loss {ev.loss:.4f} | ppl {ev.ppl:.2f} | {ev.num_tokens} tokens | {ev.num_segments} segments"
        )
        if ev.unigram_ppl is not None:
            print(f"unigram baseline ppl {ev.unigram_ppl:.2f}")
        for label, (loss, n) in ev.by_position.items():
            print(f"  tokens {label:>15}: loss {loss:.4f} | {n} tokens")
        return 0
    if cfg.data.source == "recall":
        from memscale.eval.recall import evaluate_recall, parse_distances

        T = cfg.data.segment_len
        distances = parse_distances(args.distances, T) if args.distances else [cfg.data.task_segments * T]
        print(f"checkpoint {path}")
        for r in evaluate_recall(
            model,
            loader.examples,
            distances=distances,
            num_examples=args.segments or 64,
            num_streams=cfg.data.num_streams,
            log=print,
        ):
            print(
                f"recall at {r.distance:>9,} tokens: exact match {r.exact_match:.4f} | value-token accuracy "
                f"{r.accuracy:.4f} | {r.num_examples} documents (chance {r.chance:.4f} per token)"
            )
        return 0
    from memscale.eval.tasks import evaluate_task

    acc = evaluate_task(model, loader, num_examples=args.segments)
    print(f"checkpoint {path}")
    print(
        f"{cfg.data.source}: answer accuracy {acc.accuracy:.4f} over {acc.num_answers} answers "
        f"(chance {acc.chance:.4f})"
    )
    return 0
