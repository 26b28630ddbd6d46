"""The training loop: one loop for every memory kind and every parallel layout.

    build model -> stream segments -> BPTT window -> clip -> AdamW step -> log -> checkpoint -> validate

On several processes (memscale/train/distributed.py) the model is this rank's TP shard and pipeline stage, the
window runs through `run_window` (pp=1) or the pipeline runtime (pp > 1, memscale/train/pipeline.py), and the
DeepSpeed engine reduces, clips and steps; one process runs `run_window` and torch's AdamW as it always did.

Run it with `memscale train configs/quickstart.yaml --set train.max_steps=20`.

Nothing is lost (README, "When things go wrong"):
- a step whose loss or gradient norm is not finite is skipped; `train.max_bad_steps` in a row raise
  `TrainingDiverged` (exit code 3) without writing the bad state;
- one run per `train.out_dir` (memscale/train/rundir.py);
- every shard the run reads is verified before step 1, and a checkpoint is written before each validation;
- SIGTERM / SIGUSR1 finish the current optimizer step, write a checkpoint and return with `preempted` set
  (exit code 75, EX_TEMPFAIL, for a scheduler to requeue);
- `--resume` falls back to the newest checkpoint that verifies; resumed runs follow the current config's
  schedule from the resumed step and print which keys changed.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memscale import kernels
from memscale.checkpoint import simple as ckpt
from memscale.config import Config, ConfigError, model_architecture, to_dict
from memscale.data.sources import build_loader, data_vocab_size, unigram_logp
from memscale.eval.evaluate import evaluate_lm
from memscale.models import MemoryTransformer
from memscale.models.memory.base import MemoryState
from memscale.train import distributed
from memscale.train.bptt import History, run_window
from memscale.train.metrics import MetricsLogger
from memscale.train.optim import apply_hyperparameters, build_optimizer
from memscale.train.precision import autocast
from memscale.train.rundir import RunLock, check_out_dir
from memscale.utils.flops import PeakMeter

EXIT_DIVERGED = 3
"""`memscale train` exit code after `train.max_bad_steps` skipped steps in a row."""
EXIT_PREEMPTED = 75
"""`memscale train` exit code after SIGTERM / SIGUSR1: checkpoint written, continue with --resume (EX_TEMPFAIL)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


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
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm."""
    preempted: str | None = None
    """The signal (SIGTERM, SIGUSR1) that stopped the run early, after writing `checkpoint`."""


class _StopSignals:
    """Turns SIGTERM / SIGUSR1 into a flag that the loop reads between optimizer steps (Slurm sends these before
    it preempts or times out a job). Only the main thread can install handlers; elsewhere this is a no-op."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key old -> new` for every config key whose value differs between a checkpoint and this run."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _non_finite_rows(state: MemoryState) -> torch.Tensor | None:
    bad = None
    for t in state.tensors.values():
        if t.is_floating_point():
            rows = ~torch.isfinite(t).flatten(1).all(dim=1)
            bad = rows if bad is None else bad | rows
    return bad


class _Silent:
    """The metrics logger of ranks other than 0: rank 0 alone writes TensorBoard and the terminal."""

    def scalars(self, *a, **k) -> None: ...

    def progress(self, *a, **k) -> None: ...

    def line(self, *a, **k) -> None: ...

    def close(self) -> None: ...


def _layout(extra: dict, *, num_layers: int) -> str:
    """The process layout a multi-process checkpoint records, in words (pp named when > 1: checkpoints from before
    pipeline parallelism record none; its layers per stage too: checkpoints from before uneven splits record none,
    and cut num_layers / pp each)."""
    pp = extra.get("pp", 1)
    split = extra.get("pp_layers") or ",".join([str(num_layers // pp)] * pp)
    return (
        f"{extra.get('world_size', 1)} processes (tp={extra.get('tp', 1)}"
        f"{f', pp={pp} with layers {split}' if pp > 1 else ''}, ZeRO-{extra.get('zero_stage', 0)})"
    )


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, resume_from: str | None = None, log=None):
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.device = torch.device(cfg.train.device)
        # Several processes (torchrun / --nproc): process groups first, rank 0 alone speaks and writes.
        self.dist = distributed.Distributed(cfg) if distributed.wanted(cfg) else None
        self.is_main = self.dist is None or self.dist.is_main
        self.say = (log or (lambda text: print(text, flush=True))) if self.is_main else (lambda text: None)
        resuming = resume or resume_from is not None
        # Everything that can fail on user input is checked before anything is written to disk: the config
        # against the data, and every shard this run will read (building a loader verifies its split's
        # checksums), so a damaged validation shard stops the run now and not after hours of training.
        if self.is_main:  # the directory is rank 0's to check and to lock
            check_out_dir(self.out_dir, resume=resuming, overwrite=cfg.train.overwrite)
        vocab = data_vocab_size(cfg.data)
        if vocab is not None and vocab != cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer of {cfg.data.dir} "
                f"({vocab}): set model.vocab_size={vocab}"
            )
        self.slice = {"rank": self.dist.dp_rank, "world_size": self.dist.dp} if self.dist else {}
        self.train_loader = build_loader(cfg, "train", infinite=True, **self.slice)
        if cfg.train.eval_every:
            build_loader(cfg, "val", infinite=False, **self.slice)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        kernels.set_backend(cfg.train.kernels)
        torch.manual_seed(cfg.train.seed)
        self.model = MemoryTransformer(cfg.model, segment_len=cfg.data.segment_len).to(self.device)
        self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.num_params, self.flops_per_token = self.model.num_params(), self.model.flops_per_token()
        self.pipeline = None
        # Several processes: the same plain model on every rank, cut into this rank's stage and TP shard.
        if self.dist is not None:
            if self.dist.pp > 1:
                self.model = self.dist.cut(self.model)
                self.model.set_activation_checkpointing(cfg.train.activation_checkpointing)
            self.model = self.dist.shard(self.model)
            if self.dist.pp > 1:
                self.pipeline = self.dist.start_pipeline(self.model)
        self.optimizer = build_optimizer(self.model, cfg.train)
        # What the loop calls like the model: the model itself, or the engine's view of it (memscale/parallel/zero.py).
        self.net = self.model
        if self.dist is not None:
            self.net = self.dist.wrap(
                self.model, self.optimizer, batch_size=cfg.data.num_streams, segment_len=cfg.data.segment_len
            )
            self.optimizer = self.dist.optimizer
            self.dist.seed(cfg.train.seed)  # same initial weights, own dropout masks per data-parallel rank
        self.state = self.net.init_state(cfg.data.num_streams)
        self.history = History()  # sliding BPTT depth: the segments the next step runs again
        self.step = 0
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resumed_from: Path | None = None
        # Held until train() returns, by rank 0 for all ranks; see rundir.py.
        self.lock = RunLock(self.out_dir).acquire() if self.is_main else None
        try:
            if resume_from is not None:
                path = ckpt.resolve(self.ckpt_root, resume_from)
                ts = ckpt.load(path)
                ckpt.check_finite(ts)
                self._restore(path, ts)
            elif resume and not ckpt.has_any(self.ckpt_root):
                # A job script passes --resume on every start (launch/slurm/train.sbatch): the first start of a
                # run has nothing to continue. Damaged checkpoints are not "nothing": load_for_resume refuses.
                self.say(f"resume: no checkpoint under {self.ckpt_root} yet: starting at step 0")
            elif resume:
                self._restore(*ckpt.load_for_resume(self.ckpt_root, say=self.say))
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.dist is not None:
            self.dist.close()

    # -- checkpointing -------------------------------------------------------------------------------------------
    def gather_state(self) -> ckpt.TrainState:
        return ckpt.TrainState(
            step=self.step,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            # The schedule is a function of the step and the config (optim.apply_hyperparameters): nothing to
            # restore. The rate in effect is kept for reading.
            scheduler={"lr": self.optimizer.param_groups[0]["lr"]},
            loader=self.train_loader.state_dict(),
            memory=self.state.state_dict(),
            rng=ckpt.rng_state(),
            config=to_dict(self.cfg),
            history=self.history.state_dict(),
        )

    def _pp_layers(self) -> str:
        """This run's layers per pipeline stage, e.g. "3,1" (what a resume must cut the same way)."""
        from memscale.parallel.pipeline.balance import stage_layers

        return ",".join(map(str, stage_layers(self.cfg))) if self.dist.pp > 1 else ""

    def _restore(self, path: Path, ts: ckpt.TrainState) -> None:
        if model_architecture(ts.config.get("model", {})) != model_architecture(self.cfg.model):
            raise ConfigError(
                f"--resume: the model config differs from the one saved in {path}: resume with the same model.* keys"
            )
        L = self.cfg.model.num_layers
        saved = _layout(ts.extra, num_layers=L) if ts.extra else None
        here = (
            _layout(
                {
                    "world_size": self.dist.dims.world_size,
                    "tp": self.dist.tp,
                    "pp": self.dist.pp,
                    "pp_layers": self._pp_layers(),
                    "zero_stage": self.dist.dims.zero_stage,
                },
                num_layers=L,
            )
            if self.dist
            else None
        )
        if saved != here:
            raise ConfigError(
                f"--resume: {path} was written by {saved or 'one process'}, this run is {here or 'one process'}: "
                "resume with the same layout (resharding to another one comes with sharded checkpoints)"
            )
        if self.dist is None:
            ckpt.load_weights(self.model, path, ts.model)
            self.optimizer.load_state_dict(ts.optimizer)
            self.state = MemoryState.from_state_dict(ts.memory, device=self.device)
            ckpt.set_rng_state(ts.rng)
            if self.cfg.train.bptt_depth is not None:  # a window run ignores a saved history
                self.history = History.from_state_dict(ts.history, device=self.device)
        else:
            self.dist.load(path, ts.rng)
            self.state = self.dist.local_memory(ts.memory, device=self.device)
            if self.cfg.train.bptt_depth is not None:
                self.history = History.from_state_dict(
                    self.dist.local_history(ts.history), device=self.device
                )
            if self.pipeline is not None:
                self.state = self.pipeline.own_part(self.state)
        self.train_loader.load_state_dict(ts.loader)
        self.step = ts.step
        self.resumed_from = path
        changes = config_changes(ts.config, to_dict(self.cfg))
        self.say(f"resume: {path} at step {ts.step}")
        if changes:
            self.say(f"resume: config changed since {path.name}: {'; '.join(changes)}")

    def save(self) -> Path | None:
        """Write a checkpoint; its path (None on ranks other than 0)."""
        keep = self.cfg.train.keep_checkpoints
        if self.dist is None:
            return ckpt.save(self.ckpt_root, self.gather_state(), keep=keep)

        history = self.dist.gather_history(self.history.state_dict())  # a collective: every rank

        def make_state(memory, rng, weights) -> ckpt.TrainState:
            return ckpt.TrainState(
                step=self.step,
                model=weights,
                optimizer={},  # in deepspeed/, one partition per rank
                scheduler={"lr": self.optimizer.param_groups[0]["lr"]},
                loader=self.train_loader.state_dict(),
                memory=memory,
                rng=rng,
                config=to_dict(self.cfg),
                extra={
                    "world_size": self.dist.dims.world_size,
                    "tp": self.dist.tp,
                    "pp": self.dist.pp,
                    "pp_layers": self._pp_layers(),
                    "dp": self.dist.dp,
                    "zero_stage": self.dist.dims.zero_stage,
                },
                history=history,
            )

        return self.dist.save(
            self.ckpt_root, step=self.step, state=self.state, make_state=make_state, keep=keep
        )

    def _validate(self, logger, uni) -> tuple[float, float]:
        """One validation pass. It runs under its own RNG state, so training after it (dropout masks, sampled
        memories) does not depend on whether or when validation ran: a run stopped before a validation and
        resumed continues exactly as one that ran it."""
        cfg = self.cfg
        forked = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with forked, autocast(cfg.train.dtype, self.device):
            loader = build_loader(cfg, "val", infinite=False, **self.slice)
            if self.pipeline is not None:  # forward only through the stages
                ev = self.pipeline.evaluate(
                    loader, num_segments=cfg.train.eval_segments, device=self.device, unigram_logp=uni
                )
            else:
                ev = evaluate_lm(
                    self.net,
                    loader,
                    num_segments=cfg.train.eval_segments,
                    num_streams=cfg.data.num_streams,
                    device=self.device,
                    unigram_logp=uni,
                )
        self.model.train()
        if self.dist is not None:  # token-weighted over the ranks' slices
            uni = math.log(ev.unigram_ppl) * ev.num_tokens if ev.unigram_ppl is not None else 0.0
            loss_sum, uni_sum, tokens = self.dist.sum(ev.loss * ev.num_tokens, uni, ev.num_tokens)
            ev.num_tokens = int(tokens)
            ev.loss = loss_sum / max(tokens, 1.0)
            ev.ppl = math.exp(min(ev.loss, 50.0))
            if ev.unigram_ppl is not None:
                ev.unigram_ppl = math.exp(uni_sum / max(tokens, 1.0))
        logger.scalars(self.step, {"val/loss": ev.loss, "val/ppl": ev.ppl})
        msg = f"validation @ step {self.step}: loss {ev.loss:.4f} | ppl {ev.ppl:.2f} | {ev.num_tokens} tokens"
        if ev.unigram_ppl is not None:
            logger.scalars(self.step, {"val/unigram_ppl": ev.unigram_ppl})
            msg += f" | unigram baseline ppl {ev.unigram_ppl:.2f}"
        self.say(msg)
        return ev.loss, ev.ppl

    # -- loop ----------------------------------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        try:
            with _StopSignals() as signals:
                return self._train(signals)
        finally:
            self._close()

    def _window(self, batches, **engine):
        """One step's window on this process (pp = 1) under the run's precision; `engine`: the data-parallel
        engine's loss scale and backward."""
        t = self.cfg.train
        with autocast(t.dtype, self.device):
            return run_window(
                self.net,
                batches,
                self.state,
                memory_grad=t.memory_grad,
                depth=t.bptt_depth,
                history=self.history,
                **engine,
            )

    def _train(self, signals: _StopSignals) -> TrainSummary:
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
        logger = MetricsLogger(self.out_dir) if self.is_main else _Silent()
        say = self.say
        peak = PeakMeter(device=self.device)
        peak.sample()
        flops_per_token = self.flops_per_token
        ranks = self.dist.dp if self.dist else 1  # data-parallel ranks: each trains its own streams
        world = self.dist.dims.world_size if self.dist else 1  # processes sharing the work
        tokens_per_step = t.bptt_segments * cfg.data.num_streams * cfg.data.segment_len * ranks
        layout = ""
        if self.dist:
            tp = f", tp={self.dist.tp}" if self.dist.tp > 1 else ""
            groups = cfg.parallel.stream_groups
            pp = f", pp={self.dist.pp} ({groups} stream groups)" if self.dist.pp > 1 else ""
            layout = f" x {ranks} ranks{tp}{pp}, ZeRO-{self.dist.dims.zero_stage}"
        stages = f" | layers per stage {self._pp_layers()}" if self.dist and self.dist.pp > 1 else ""
        say(
            f"memscale: {cfg.model.memory.kind} | {self.num_params / 1e6:.2f}M params | "
            f"{tokens_per_step} tokens/step ({t.bptt_segments} segments x {cfg.data.num_streams} streams x "
            f"{cfg.data.segment_len}{layout}){stages} | memory_grad={t.memory_grad}"
            f"{f' (sliding depth {t.bptt_depth})' if t.bptt_depth is not None else ''} | "
            f"matmul peak {peak.best / 1e9:.0f} GFLOP/s"
        )
        uni = unigram_logp(cfg.data) if t.eval_every else None
        train_iter = iter(self.train_loader)
        last = {"loss": math.nan, "val_loss": math.nan, "val_ppl": math.nan, "tok_s": 0.0, "mfu": 0.0}
        window_loss, window_targets, window_time, window_steps, window_aux = 0.0, 0, 0.0, 0, 0.0
        skipped, streak = 0, 0
        path = self.resumed_from
        if self.step >= t.max_steps:
            say(f"nothing to do: step {self.step} already reaches train.max_steps={t.max_steps}")
        self.model.train()
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                batches = [next(train_iter).to(self.device) for _ in range(t.bptt_segments)]
                lr = apply_hyperparameters(self.optimizer, t, step=self.step)
                if self.dist is None:
                    self.optimizer.zero_grad(set_to_none=True)
                    result = self._window(batches)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip).item()
                    loss_sum, num_targets, aux_sum = result.loss_sum, result.num_targets, result.aux_sum
                    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
                    if finite:
                        self.optimizer.step()
                else:  # the engine reduces, clips and steps, and skips a non-finite update itself
                    scale = self.dist.loss_scale(sum(b.num_targets for b in batches))
                    if self.pipeline is not None:  # through the stages (memscale/train/pipeline.py)
                        with autocast(t.dtype, self.device):
                            result, state = self.pipeline.train_step(
                                batches, self.state, loss_scale=scale, backward=self.dist.engine.backward
                            )
                    else:
                        result = self._window(batches, loss_scale=scale, backward=self.dist.engine.backward)
                        state = result.state
                    grad_norm = self.dist.step()
                    loss_sum, num_targets, aux_sum = self.dist.sum(
                        result.loss_sum, result.num_targets, result.aux_sum
                    )
                    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
                if self.dist is None:
                    state = result.state
                if finite:
                    streak = 0
                    window_loss += loss_sum
                    window_targets += num_targets
                    window_aux += aux_sum
                    self.history = getattr(result, "history", None) or History()
                else:
                    # Skip the update: the weights and the optimizer moments stay as they were, and streams whose
                    # memory went non-finite restart from the initial memory. A sliding depth's history is dropped
                    # (it would recompute the bad memory): the next step starts from the state below.
                    self.history = History()
                    skipped, streak = skipped + 1, streak + 1
                    bad_B = _non_finite_rows(state)
                    if self.pipeline is not None:
                        state = self.pipeline.restart_rows(state, bad_B)
                    elif bad_B is not None and bool(bad_B.any()):
                        state = state.where(bad_B, self.net.init_state(len(bad_B), device=self.device))
                    logger.scalars(self.step + 1, {"train/skipped_steps": skipped})
                    say(
                        f"step {self.step + 1}: loss {loss_sum / max(num_targets, 1):.4g}, "
                        f"grad norm {grad_norm:.4g}: not finite, optimizer step skipped "
                        f"({streak} in a row, {skipped} in all; the run stops at {t.max_bad_steps} in a row)"
                    )
                self.state = state
                self.step += 1
                window_time += time.perf_counter() - t0
                window_steps += 1
                if streak >= t.max_bad_steps:
                    good = ckpt.latest(self.ckpt_root)
                    where = (
                        f"the newest checkpoint is {good}: resume from it with a lower train.lr "
                        f"(--resume-from {ckpt.step_of(good)} --set train.lr=...)"
                        if good is not None
                        else "no checkpoint was written: lower train.lr and start again"
                    )
                    raise TrainingDiverged(
                        f"training diverged: {streak} optimizer steps in a row (up to step {self.step}) had a "
                        f"non-finite loss or gradient norm (train.max_bad_steps={t.max_bad_steps}); {where}"
                    )
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    step_s = window_time / window_steps
                    tok_s = tokens_per_step / step_s
                    mfu = tok_s / world * flops_per_token / peak.sample()  # per process: its own matmul peak
                    loss = window_loss / window_targets if window_targets else math.nan
                    logger.scalars(
                        self.step,
                        {
                            "train/loss": loss,
                            "train/ppl": math.exp(min(loss, 50.0)),
                            "train/lr": lr,
                            "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tok_s,
                            "train/mfu": mfu,
                            "train/skipped_steps": skipped,
                            # The kind's own regulariser (infinity's KL term) per target, not in train/loss.
                            **({"train/aux_loss": window_aux / window_targets} if window_aux else {}),
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
                        skipped=skipped,
                    )
                    last.update(loss=loss, tok_s=tok_s, mfu=mfu)
                    window_loss, window_targets, window_time, window_steps, window_aux = 0.0, 0, 0.0, 0, 0.0
                final = self.step == t.max_steps
                stop = signals.received
                if (
                    self.dist is not None
                ):  # every rank stops after the same step, or the checkpoint would hang
                    stop = self.dist.agree_stop(stop)
                # A checkpoint is written before the validation that may fail; never during a streak of skipped
                # steps, whose weights produced a non-finite loss.
                if streak == 0 and (final or stop or (t.save_every and self.step % t.save_every == 0)):
                    path = self.save()
                    say(f"checkpoint: {path}")
                if stop and not final:
                    say(
                        f"{stop} received: stopped after step {self.step}, checkpoint {path}; "
                        f"continue with --resume (exit code {EXIT_PREEMPTED})"
                    )
                    return self._summary(last, path, skipped, preempted=stop)
                if t.eval_every and (self.step % t.eval_every == 0 or final):
                    last["val_loss"], last["val_ppl"] = self._validate(logger, uni)
        finally:
            logger.close()
        return self._summary(last, path, skipped)

    def _summary(self, last: dict, path: Path | None, skipped: int, *, preempted: str | None = None):
        return TrainSummary(
            steps=self.step,
            final_loss=last["loss"],
            val_loss=last["val_loss"],
            val_ppl=last["val_ppl"],
            tokens_per_s=last["tok_s"],
            mfu=last["mfu"],
            out_dir=str(self.out_dir),
            checkpoint=str(path) if path is not None else "",
            skipped_steps=skipped,
            preempted=preempted,
        )


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
