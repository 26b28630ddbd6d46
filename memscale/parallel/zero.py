"""Data parallelism with ZeRO 1, 2 and 3 through DeepSpeed, over the data-parallel group of `ParallelDims`.

    groups = init_distributed(dims)
    optimizer = build_optimizer(model, cfg.train)                 # memscale's AdamW (decay groups), a torch optimizer
    engine = build_engine(model, optimizer, cfg, dims, groups=groups, probe=lambda m: m.step(...))
    scale = engine.global_token_scale(num_targets_this_rank)      # dp / (targets over all dp ranks)
    for each segment:   out = engine.model.step(...);  engine.backward(out.loss_sum * scale)        # k times
    replay:             engine.backward([loss_t * scale, state_t], [None, grad_from_t_plus_1])       # several roots
    grad_norm = engine.step()                                     # one reduction of the summed gradient, one update

What DeepSpeed does not give directly, and how it is solved here:

- **Several backward calls per optimizer step** (memory_grad=detached and replay call backward once per segment,
  k times per window). ZeRO-2/3 refuse `no_sync`, and DeepSpeed's managed accumulation counts a fixed number of
  micro-steps. The engine runs with `managed_gradient_accumulation: false`: each `engine.backward` only accumulates
  (ZeRO-2/3 reduce-scatter into the accumulated gradient partition as buckets fill; ZeRO-1 keeps local `.grad`), and
  `engine.step()` is the one boundary: ZeRO-1 reduces the summed gradient there, all stages clip and step once.
  Every data-parallel rank must therefore call `backward` the same number of times per step.
- **Plain backward calls.** DeepSpeed 0.19 hooks the engine's outputs, so `loss.backward()` and
  `torch.autograd.backward(roots, grads)` on tensors computed through `engine.model` are handled like
  `engine.backward` (checked: memscale/train/bptt.py's `run_window`, unchanged, equals one process under ZeRO 1/2/3
  for rmt, detached and replay). `ZeroEngine.backward` is the explicit path that does not depend on those hooks.
- **Passes into the memory alone** (a sliding `train.bptt_depth`, memscale/train/bptt.py): after a segment's
  backward through the engine (with `retain_graph`), `torch.autograd.grad` into its input state. The engine's
  output hooks run its backward bookkeeping once per forward, on the first pass, so these later passes reach no
  engine code and accumulate no weight gradient (checked against one process under ZeRO-2 and ZeRO-3).
- **Several roots** (replay backpropagates a segment's loss and the gradient that reached its output state):
  `autograd.backward([loss, s], [None, g])` equals the backward of the scalar `loss + (s * g).sum()` with `g`
  detached, which is what `ZeroEngine.backward` hands to `engine.backward`.
- **Loss normalisation**: memscale's loss is the sum of token cross-entropies divided by the number of target
  tokens of the window over *all* data-parallel ranks. DeepSpeed averages gradients over dp; `global_token_scale`
  returns dp / N_global, so that the average of the ranks' gradients is the gradient of the global mean.
- **Parameters used outside their owning module's forward.** ZeRO-3 keeps each parameter as an empty shard except
  while it is gathered: during its owning module's forward, or (DeepSpeed 0.19) when it is read as a module
  attribute while the *engine's* forward runs (fetch-on-access through `ZeROOrderedDict`, which then registers it as
  external). Outside the engine's forward nothing gathers it: `model.init_state(B)` expands an rmt/memformer init
  parameter into a silently empty state. Two parts: (1) every model method the trainer calls (`step`, `init_state`,
  ...) runs inside one forward of a small root module (`_Dispatch`), through `ZeroEngine.model`; (2) uses that do not
  go through a module attribute (a Python reference kept elsewhere, iteration over `parameters()`) are found by
  `find_external_parameters`, which runs a probe of the plain model once and sees every op that receives a parameter
  while no module owning it is in forward; `deepspeed.zero.register_external_parameter` registers each on the
  innermost module in forward there. Inputs and outputs cross the root's forward as flat tuples of tensors, so
  ZeRO-3's backward hooks see every tensor (they do not look inside dataclasses or `MemoryState`).

DeepSpeed is imported lazily (the import costs seconds). fp16 is not supported: its loss scale would also scale the
state gradients that replay carries between segments; use fp32 (CPU) or bf16 (GPU).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from memscale.config import Config, ConfigError
from memscale.parallel.dims import ParallelDims, ParallelGroups

# --------------------------------------------------------------------------------------------------------------
# The DeepSpeed config, derived from memscale's typed config.


# DeepSpeed's bucket defaults (elements): reduce and all-gather 5e8, ZeRO-3 prefetch 5e7.
DEEPSPEED_BUCKET = 500_000_000
DEEPSPEED_PREFETCH = 50_000_000
# Below 16 x 5e8 parameters, buckets of 1/16 of the model instead: a bucket is a buffer held for the whole run
# (4 bytes per element in fp32), so one the size of the model would cost as much as its gradients.
BUCKETS_PER_MODEL = 16


def deepspeed_config(
    cfg: Config,
    dims: ParallelDims,
    *,
    client_optimizer: bool = True,
    zero3_persist_below: int | None = None,
    num_params: int | None = None,
) -> dict:
    """The DeepSpeed config dict for `cfg` on layout `dims`; never written by hand.

    Batch sizes: one "micro-batch" is one optimizer step's window of `data.num_streams` streams on one dp rank; the
    window's segments are backward calls inside that micro-batch (unmanaged accumulation), so
    gradient_accumulation_steps is 1 and train_batch_size = num_streams * dp. DeepSpeed uses these numbers only for
    bookkeeping (samples seen): the loss scale comes from `global_token_scale`, not from them.

    With `client_optimizer` (the default) the optimizer is memscale's torch AdamW from `build_optimizer`
    (lr, betas and weight decay per parameter group come from `train`), and no "optimizer" section is emitted.
    Without it, the section below builds the same AdamW (torch implementation: no JIT-compiled fused/CPU Adam) over
    whatever parameter groups are passed to deepspeed.initialize.

    `num_params` (this rank's parameter count) sizes the communication buckets: DeepSpeed allocates its reduce
    and all-gather buckets whole (5e8 elements, 1.9 GB in fp32, each), which for a model smaller than 16 x that is
    memory held for nothing; there they hold 1/16 of the model (`BUCKETS_PER_MODEL`).
    """
    t = cfg.train
    if t.dtype == "bfloat16" and t.device == "cpu":
        raise ConfigError("train.dtype=bfloat16 on train.device=cpu: use float32 on CPU")
    stage = dims.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            # Contiguous buffers keep the partitioned gradients in one allocation; overlap_comm only helps with a
            # separate communication stream (CUDA) and needs managed accumulation below stage 2.
            contiguous_gradients=True,
            overlap_comm=stage >= 2 and t.device.startswith("cuda"),
            reduce_scatter=True,
        )
        if num_params is not None:
            # A multiple of 64 elements: DeepSpeed requires a multiple of its start alignment (2) for NCCL.
            bucket = max(64, num_params // BUCKETS_PER_MODEL // 64 * 64)
            zero.update(
                reduce_bucket_size=min(DEEPSPEED_BUCKET, bucket),
                allgather_bucket_size=min(DEEPSPEED_BUCKET, bucket),
            )
            if stage == 3:
                zero.update(stage3_prefetch_bucket_size=min(DEEPSPEED_PREFETCH, bucket))
    if stage == 3 and zero3_persist_below is not None:
        # ZeRO-3 leaves parameters with fewer elements than this unpartitioned (DeepSpeed's default: 1e5): no
        # collective per forward for norms, biases and memory vectors, at the price of a full copy on every rank.
        # 0 partitions everything (the tests use it: tiny models would otherwise not be partitioned at all).
        zero.update(stage3_param_persistence_threshold=zero3_persist_below)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.num_streams,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.num_streams * dims.dp,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        # bf16 is autocast over float32 weights (memscale/train/precision.py), the same in every layout: the
        # engine holds and reduces float32, and DeepSpeed's own bf16 mode (a bf16 model with float32 masters in
        # the optimizer) stays off.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # A torch optimizer under ZeRO is what memscale passes; DeepSpeed otherwise refuses it as "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not client_optimizer:
        out["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# The mpu adapter: DeepSpeed's view of megatron-core's groups.


class MegatronMPU:
    """What DeepSpeed's `mpu=` argument reads, answered from `ParallelGroups` (megatron-core's groups).

    DeepSpeed speaks the pre-pipeline Megatron dialect: its "model parallel" rank is the tensor-parallel rank (a
    TP-replicated parameter's gradient counts once in the global norm, on tp rank 0) while its "model parallel"
    group must span everything that holds different parameters (tp x pp) so that the norm sums over it. Five names
    are missing from parallel_state (get_model_parallel_rank/world_size, get_pipe_parallel_group,
    get_sequence_parallel_world_size, get_data_parallel_group_ranks); the rest is forwarded. memscale has no Ulysses
    sequence parallelism, so its size is 1. Deliberately no `initialize_sequence_parallel`: DeepSpeed takes its
    presence as "Ulysses mpu" and then ignores the model-parallel group.
    """

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    def get_tensor_model_parallel_group(self):
        return self.g.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.g.dims.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.g.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.g.tp_ranks[0]

    def get_pipeline_model_parallel_group(self):
        return self.g.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.g.dims.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.g.pp_rank

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank

    def get_data_parallel_group(self):
        return self.g.dp

    def get_data_parallel_world_size(self) -> int:
        return self.g.dims.dp

    def get_data_parallel_rank(self) -> int:
        return self.g.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.g.dp_ranks)

    def get_model_parallel_group(self):
        return self.g.model_parallel

    def get_model_parallel_world_size(self) -> int:
        return self.g.dims.tp * self.g.dims.pp

    def get_model_parallel_rank(self) -> int:
        return self.g.pp_rank * self.g.dims.tp + self.g.tp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_data_parallel_group(self):
        return self.g.dp

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.g.dims.dp

    def get_sequence_data_parallel_rank(self) -> int:
        return self.g.dp_rank


# --------------------------------------------------------------------------------------------------------------
# Inputs and outputs as flat tuples of tensors, so ZeRO-3's hooks see them.


_CONSTANTS = (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)


def _flatten(obj: Any) -> tuple[list[torch.Tensor], Callable[[Iterable[torch.Tensor]], Any]]:
    """Tensors inside tensors/dicts/lists/tuples/dataclasses/plain objects, and a function that puts new ones back."""
    leaves: list[torch.Tensor] = []

    def walk(x: Any) -> Callable[[Any], Any]:
        if isinstance(x, torch.Tensor):
            leaves.append(x)
            return lambda it: next(it)
        if isinstance(x, _CONSTANTS) or isinstance(x, (type, nn.Module)) or callable(x):
            return lambda it: x
        if isinstance(x, dict):
            subs = {k: walk(v) for k, v in x.items()}
            if type(x) is dict:
                return lambda it: {k: f(it) for k, f in subs.items()}
            return lambda it: type(x)((k, f(it)) for k, f in subs.items())
        if isinstance(x, (list, tuple)):
            subs_l = [walk(v) for v in x]
            if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
                return lambda it: type(x)(*[f(it) for f in subs_l])
            return lambda it: type(x)(f(it) for f in subs_l)
        if hasattr(x, "__dict__"):  # dataclasses, MemoryState, Batch: rebuilt as a shallow copy
            subs_o = {k: walk(v) for k, v in vars(x).items()}

            def rebuild(it: Any) -> Any:
                y = copy.copy(x)
                for k, f in subs_o.items():
                    setattr(y, k, f(it))
                return y

            return rebuild
        return lambda it: x

    build = walk(obj)
    return leaves, lambda new: build(iter(new))


class _Dispatch(nn.Module):
    """The engine's root module: runs `model.<method>(...)` inside its forward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self._out_spec: Callable | None = None

    def forward(self, method: str, in_spec: Callable, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = in_spec(leaves)
        out = getattr(self.inner, method)(*args, **kwargs)
        out_leaves, self._out_spec = _flatten(out)
        return tuple(out_leaves)


class _Facade:
    """Looks like the model to the training loop: the listed methods go through the engine, the rest is the model."""

    def __init__(self, call: Callable[..., Any], model: nn.Module, methods: Sequence[str]):
        self._call, self._model, self._methods = call, model, tuple(methods)

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            return functools.partial(self._call, name)
        return getattr(self._model, name)


# --------------------------------------------------------------------------------------------------------------
# ZeRO-3: find the parameters used outside their owning module's forward.


_METADATA = {
    "device",
    "dtype",
    "requires_grad",
    "is_leaf",
    "layout",
    "is_cuda",
    "is_sparse",
    "is_floating_point",
    "dim",
    "ndim",
    "__len__",
}


class _ParamUseTracer(TorchFunctionMode):
    def __init__(self, owners: dict[int, list[nn.Module]], stack: list[nn.Module], found: list):
        super().__init__()
        self.owners, self.stack, self.found = owners, stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(getattr(func, "__self__", None), "__name__", None) or getattr(func, "__name__", "")
        if name not in _METADATA:
            for t in _tensor_args(args, kwargs):
                if isinstance(t, nn.Parameter) and id(t) in self.owners:
                    if not any(m is o for m in self.stack for o in self.owners[id(t)]):
                        user = self.stack[-1] if self.stack else None
                        if not any(u is user and p is t for u, p in self.found):
                            self.found.append((user, t))
        return func(*args, **kwargs)


def _tensor_args(args: Any, kwargs: dict) -> Iterable[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def find_external_parameters(
    root: nn.Module, probe: Callable[[], Any]
) -> list[tuple[nn.Module | None, nn.Parameter]]:
    """(module in forward, parameter) for every parameter an op used while no module owning it was in forward.

    `probe()` runs the model once (any representative call, e.g. one segment step from an initial state); the RNG
    state is restored afterwards. A `None` module means "used outside any forward": route that call through
    `ZeroEngine.model` so that it runs inside the root's forward.
    """
    owners: dict[int, list[nn.Module]] = {}
    for m in root.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    stack: list[nn.Module] = []
    found: list[tuple[nn.Module | None, nn.Parameter]] = []
    handles = []

    def enter(mod: nn.Module, _inputs: Any) -> None:
        stack.append(mod)

    def leave(mod: nn.Module, _inputs: Any, _output: Any) -> None:  # returns None: the output stays as it is
        stack.pop()

    for m in root.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    rng = torch.get_rng_state()
    try:
        with _ParamUseTracer(owners, stack, found):
            probe()
    finally:
        for h in handles:
            h.remove()
        torch.set_rng_state(rng)
    return found


# --------------------------------------------------------------------------------------------------------------
# The engine.


class ZeroEngine:
    """A DeepSpeed engine over `model`, with the calls memscale's BPTT windows need (see the module docstring)."""

    def __init__(self, engine: Any, root: _Dispatch, groups: ParallelGroups, methods: Sequence[str]):
        self.engine = engine
        self.root = root
        self.groups = groups
        self.model = _Facade(self.call, root.inner, methods)
        """Use like the model: `engine.model.step(...)`, `engine.model.init_state(...)` run inside the engine."""

    @property
    def module(self) -> nn.Module:
        """The plain model (its parameters are partitioned under ZeRO-3)."""
        return self.root.inner

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        leaves, in_spec = _flatten((args, kwargs))
        out = self.engine(method, in_spec, *leaves)
        return self.root._out_spec(out)

    def backward(
        self,
        roots: torch.Tensor | Sequence[torch.Tensor],
        grad_tensors: Sequence[torch.Tensor | None] | None = None,
        retain_graph: bool = False,
    ) -> None:
        """Like `torch.autograd.backward(roots, grad_tensors, retain_graph)`, through the engine; any number of calls
        per step."""
        if isinstance(roots, torch.Tensor):
            roots = [roots]
        if grad_tensors is None:
            grad_tensors = [None] * len(roots)
        terms = []
        for r, g in zip(roots, grad_tensors, strict=True):
            if not r.requires_grad:
                continue
            if g is None:
                if r.numel() != 1:
                    raise RuntimeError(
                        "a root without a gradient must be a scalar, as in torch.autograd.backward"
                    )
                terms.append(r.reshape(()))
            else:
                terms.append((r * g.detach()).sum())
        if not terms:
            # ZeRO-2/3 reduce inside backward: a rank that skipped one would leave the others waiting.
            raise RuntimeError(
                "nothing to backpropagate: every data-parallel rank must call backward equally often"
            )
        surrogate = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        # scale_wrt_gas=False: the loss is already normalised by the global token count (global_token_scale).
        self.engine.backward(surrogate, retain_graph=retain_graph, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce the gradient accumulated since the last step (once), clip, update; returns the pre-clip norm.

        (NaN under zero_stage=0 with train.grad_clip=0: DeepSpeed computes no norm there.)"""
        self.engine.step()
        # ZeRO-3 keeps each parameter's reduced gradient partition in one flat buffer that it never clears: the first
        # backward after a step *copies* into a parameter's slot, later ones add (micro_step_id, stage3.py
        # partition_grads), and the optimizer reads every slot. A parameter that gets no gradient in the first
        # backward of a step but does later (replay: the memory's write weights, whose output the last segment's loss
        # does not use) would add onto the previous step's gradient, and one unused for a whole step would be stepped
        # with it again. Measured: replay under ZeRO-3 drifted from the reference from the second step on. A zeroed
        # buffer makes copy and add the same thing. (DeepSpeed 0.19.8; one memset of the local partition per step.)
        flat = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def global_token_scale(self, num_targets: int) -> float:
        """dp / (target tokens summed over the dp group): multiply the local loss sum by it before backward."""
        import torch.distributed as dist

        n = torch.tensor([float(num_targets)], dtype=torch.float64)
        dist.all_reduce(n, group=self.groups.dp)
        return self.groups.dims.dp / max(n.item(), 1.0)


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    cfg: Config,
    dims: ParallelDims,
    *,
    groups: ParallelGroups,
    probe: Callable[[Any], Any] | None = None,
    external: Iterable[tuple[nn.Module, nn.Parameter]] = (),
    lr_scheduler: Any = None,
    zero3_persist_below: int | None = None,
    methods: Sequence[str] = ("step", "init_state", "forward"),
) -> ZeroEngine:
    """Wrap `model` (plain, unpartitioned, on its device) and `optimizer` in a DeepSpeed engine for `dims`.

    Under ZeRO-3, `probe(model_like)` is run once on the plain model, through the same dispatch the engine uses, to
    find parameters used outside their owner's forward (`find_external_parameters`); `external` adds pairs by hand.
    `lr_scheduler` is a scheduler or a callable `optimizer -> scheduler` (DeepSpeed steps it with the optimizer).
    `zero3_persist_below`: see `deepspeed_config`.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        raise RuntimeError("call memscale.parallel.dims.init_distributed(dims) before build_engine")
    root = _Dispatch(model)
    pairs = list(external)
    if dims.zero_stage == 3 and probe is not None:

        def plain_call(method: str, *args: Any, **kwargs: Any) -> Any:
            leaves, in_spec = _flatten((args, kwargs))
            out = root(method, in_spec, *leaves)
            return root._out_spec(out)

        found = find_external_parameters(root, lambda: probe(_Facade(plain_call, model, methods)))
        pairs += [(m if m is not None else root, p) for m, p in found]
    if dims.zero_stage == 3:
        for module, param in pairs:
            deepspeed.zero.register_external_parameter(module, param)
    # DeepSpeed wraps torch.distributed (and, on CPU, loads its shared-memory op: ~6 s cached, ~50 s compiled the
    # first time into $TORCH_EXTENSIONS_DIR). The default group exists already; this only attaches to it.
    deepspeed.init_distributed(dist_backend=groups.backend, auto_mpi_discovery=False)
    engine, _, _, _ = deepspeed.initialize(
        model=root,
        optimizer=optimizer,
        model_parameters=None
        if optimizer is not None
        else [p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lr_scheduler,
        mpu=MegatronMPU(groups),
        config=deepspeed_config(
            cfg,
            dims,
            client_optimizer=optimizer is not None,
            zero3_persist_below=zero3_persist_below,
            num_params=sum(p.numel() for p in model.parameters()),
        ),
        dist_init_required=False,
    )
    if dims.zero_stage == 0:
        _record_stage0_norm(engine) if dims.pp == 1 else _clip_pipeline_stage0(engine, groups)
    return ZeroEngine(engine, root, groups, methods)


def mark_pipe_replicated(model: nn.Module, names: Iterable[str]) -> None:
    """Mark this stage's copies of the parameters several pipeline stages hold (`names`: the tied embedding, xl's u
    and v; `PipelineRuntime.replicated`) `ds_pipe_replicated` on every stage but the first that holds them, so that
    a global gradient norm counts each once. DeepSpeed's ZeRO-1 norm (stage_1_and_2.py) skips the marked ones, as
    for its own PipelineModule's tied weights; `_clip_pipeline_stage0` does the same without ZeRO."""
    for p in names:
        model.get_parameter(p).ds_pipe_replicated = True


def _clip_pipeline_stage0(engine: Any, groups: ParallelGroups) -> None:
    """ZeRO-0 clipping under pipeline parallelism, written here because DeepSpeed's `clip_grad_norm_` counts a
    parameter that is not TP-sharded on model-parallel rank 0 only (stage 0's: the other stages' layers would be
    left out of the norm) and does not skip `ds_pipe_replicated` copies. Here each gradient counts once: TP-sharded
    ones on every TP rank (its shard), the others on TP rank 0, a replicated one on the stage that owns it; summed
    over tp x pp. The gradients are already averaged over dp when DeepSpeed clips. A non-finite norm (the same on
    every rank) drops the gradients, so the torch optimizer DeepSpeed steps next leaves every parameter and its
    moments as they are: the step is skipped, as the training loop expects of the engine."""
    import torch.distributed as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter

    def clip_and_keep_norm() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        for p in params:
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if groups.tp_rank > 0 and not is_model_parallel_parameter(p):
                continue
            sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=groups.model_parallel)
        norm = sq.sqrt().item()
        engine._global_grad_norm = norm
        if not math.isfinite(norm):
            for p in params:
                p.grad = None
            return
        coef = min(1.0, engine.gradient_clipping() / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)

    engine.clip_fp32_gradients = clip_and_keep_norm


def _record_stage0_norm(engine: Any) -> None:
    """Without ZeRO, DeepSpeed clips through `clip_fp32_gradients`, which drops the norm it computes, so
    `get_global_grad_norm()` stays None. Same clip, norm kept (the TP-aware norm of deepspeed.runtime.utils)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        norm = float(clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), mpu=engine.mpu))
        engine._global_grad_norm = norm
        if not math.isfinite(norm):
            # Stage 0 has no overflow check in fp32, and a NaN coefficient does not clip (NaN < 1 is false): the
            # update would write NaN into every weight. Without gradients torch's AdamW leaves a parameter and its
            # moments untouched, so the step is skipped; the norm (the same on every rank, after the all-reduce)
            # tells the loop.
            for p in engine.module.parameters():
                p.grad = None

    engine.clip_fp32_gradients = clip_and_keep_norm
