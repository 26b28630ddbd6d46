"""The training loop: one loop for every memory kind (and, later, every parallel layout).

    build model -> stream segments -> BPTT window -> clip -> AdamW step -> log -> validate -> checkpoint

Run it with `memscale train configs/quickstart.yaml --set train.max_steps=20`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memscale.checkpoint import simple as ckpt
from memscale.config import Config, ConfigError, model_architecture, to_dict
from memscale.data.sources import build_loader, data_vocab_size, unigram_logp
from memscale.eval.evaluate import evaluate_lm
from memscale.models import MemoryTransformer
from memscale.models.memory.base import MemoryState
from memscale.train.bptt import run_window
from memscale.train.metrics import MetricsLogger
from memscale.train.optim import build_optimizer, build_scheduler
from memscale.utils.flops import PeakMeter


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    val_loss: float
    val_ppl: float
    tokens_per_s: float
    mfu: float
    out_dir: str
    checkpoint: str


def _check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume or overwrite or not out_dir.exists():
        return
    if any(out_dir.iterdir()):
        raise ConfigError(
            f"train.out_dir={out_dir} already holds files: pass --resume to continue that run, "
            "choose another train.out_dir, or set train.overwrite=true"
        )


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, log=None):
        self.cfg = cfg
        self.resume = resume
        self.out_dir = Path(cfg.train.out_dir)
        self.device = torch.device(cfg.train.device)
        # Everything that can fail on user input is checked before anything is written to disk.
        _check_out_dir(self.out_dir, resume=resume, overwrite=cfg.train.overwrite)
        vocab = data_vocab_size(cfg.data)
        if vocab is not None and vocab != cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer of {cfg.data.dir} "
                f"({vocab}): set model.vocab_size={vocab}"
            )
        self.train_loader = build_loader(cfg, "train", infinite=True)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.state = self.model.init_state(cfg.data.num_streams)
        self.step = 0
        self.log = log
        self.ckpt_root = self.out_dir / "checkpoints"
        if resume:
            self._restore()

    # -- checkpointing -------------------------------------------------------------------------------------------
    def gather_state(self) -> ckpt.TrainState:
        return ckpt.TrainState(
            step=self.step,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            loader=self.train_loader.state_dict(),
            memory=self.state.state_dict(),
            rng=ckpt.rng_state(),
            config=to_dict(self.cfg),
        )

    def _restore(self) -> None:
        path = ckpt.latest(self.ckpt_root)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {self.ckpt_root}: start without --resume")
        ts = ckpt.load(path)
        if model_architecture(ts.config.get("model", {})) != model_architecture(self.cfg.model):
            raise ConfigError(
                f"--resume: the model config differs from the one saved in {path}: resume with the same model.* keys"
            )
        self.model.load_state_dict(ts.model)
        self.optimizer.load_state_dict(ts.optimizer)
        self.scheduler.load_state_dict(ts.scheduler)
        self.train_loader.load_state_dict(ts.loader)
        self.state = MemoryState.from_state_dict(ts.memory, device=self.device)
        ckpt.set_rng_state(ts.rng)
        self.step = ts.step

    def save(self) -> Path:
        return ckpt.save(self.ckpt_root, self.gather_state(), keep=self.cfg.train.keep_checkpoints)

    # -- loop ----------------------------------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        cfg, t = self.cfg, self.cfg.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
        logger = MetricsLogger(self.out_dir)
        say = self.log or logger.line
        peak = PeakMeter(device=self.device)
        peak.sample()
        flops_per_token = self.model.flops_per_token()
        tokens_per_step = t.bptt_segments * cfg.data.num_streams * cfg.data.segment_len
        say(
            f"memscale: {cfg.model.memory.kind} | {self.model.num_params() / 1e6:.2f}M params | "
            f"{tokens_per_step} tokens/step ({t.bptt_segments} segments x {cfg.data.num_streams} streams x "
            f"{cfg.data.segment_len}) | memory_grad={t.memory_grad} | matmul peak {peak.best / 1e9:.0f} GFLOP/s"
        )
        uni = unigram_logp(cfg.data) if t.eval_every else None
        train_iter = iter(self.train_loader)
        last = {"loss": math.nan, "val_loss": math.nan, "val_ppl": math.nan, "tok_s": 0.0, "mfu": 0.0}
        window_loss, window_targets, window_time, window_steps = 0.0, 0, 0.0, 0
        self.model.train()
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            batches = [next(train_iter).to(self.device) for _ in range(t.bptt_segments)]
            self.optimizer.zero_grad(set_to_none=True)
            result = run_window(self.model, batches, self.state, memory_grad=t.memory_grad)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip).item()
            self.optimizer.step()
            self.scheduler.step()
            self.state = result.state
            self.step += 1
            window_time += time.perf_counter() - t0
            window_loss += result.loss_sum
            window_targets += result.num_targets
            window_steps += 1
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                step_s = window_time / window_steps
                tok_s = tokens_per_step / step_s
                mfu = tok_s * flops_per_token / peak.sample()
                loss = window_loss / max(window_targets, 1)
                lr = self.scheduler.get_last_lr()[0]
                logger.scalars(
                    self.step,
                    {
                        "train/loss": loss,
                        "train/ppl": math.exp(min(loss, 50.0)),
                        "train/lr": lr,
                        "train/grad_norm": grad_norm,
                        "train/tokens_per_s": tok_s,
                        "train/mfu": mfu,
                        **{f"memory/norm/{k}": v for k, v in self.state.norms().items()},
                    },
                )
                logger.progress(
                    step=self.step,
                    max_steps=t.max_steps,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_per_s=tok_s,
                    mfu=mfu,
                    step_seconds=step_s,
                )
                last.update(loss=loss, tok_s=tok_s, mfu=mfu)
                window_loss, window_targets, window_time, window_steps = 0.0, 0, 0.0, 0
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                ev = evaluate_lm(
                    self.model,
                    build_loader(cfg, "val", infinite=False),
                    num_segments=t.eval_segments,
                    num_streams=cfg.data.num_streams,
                    device=self.device,
                    unigram_logp=uni,
                )
                self.model.train()
                logger.scalars(self.step, {"val/loss": ev.loss, "val/ppl": ev.ppl})
                msg = f"validation @ step {self.step}: loss {ev.loss:.4f} | ppl {ev.ppl:.2f} | {ev.num_tokens} tokens"
                if ev.unigram_ppl is not None:
                    logger.scalars(self.step, {"val/unigram_ppl": ev.unigram_ppl})
                    msg += f" | unigram baseline ppl {ev.unigram_ppl:.2f}"
                say(msg)
                last.update(val_loss=ev.loss, val_ppl=ev.ppl)
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                say(f"checkpoint: {self.save()}")
        path = self.save()
        say(f"checkpoint: {path}")
        logger.close()
        return TrainSummary(
            steps=self.step,
            final_loss=last["loss"],
            val_loss=last["val_loss"],
            val_ppl=last["val_ppl"],
            tokens_per_s=last["tok_s"],
            mfu=last["mfu"],
            out_dir=str(self.out_dir),
            checkpoint=str(path),
        )


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
