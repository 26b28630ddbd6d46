"""How many layers each pipeline stage holds: contiguous slices whose compute balances, not equal layer counts.

    counts = stage_layers(cfg, pp=2)          # e.g. [3, 1]: parallel.pp_layers, or balanced by cost
    ranges = stage_ranges(counts)             # [range(0, 3), range(3, 4)]: what each pipeline rank builds

Every place that cuts the model into stages (memscale/train/distributed.py `cut`, the planner's stage shapes,
`memscale bench pipeline`) asks this module, so a plan, a bench and a training run hold the same layers per rank.

Why not L / pp layers each: the first stage also embeds the tokens and the last also runs the final norm, the
output projection and the loss over the vocabulary. With a small model and a large vocabulary (d 256, V 4096:
the head is ~1.3 layers' worth of FLOPs) an even split leaves the first stage idle for a third of the step while
the last one computes (README "Pipeline with memory"); a pipeline runs at the pace of its slowest stage.

Cost model (FLOPs per segment token, forward + backward, the model's own accounting: `MemoryTransformer.
flops_per_token`, PaLM-style 6 x parameters + 12 x D x mean attended keys):
  - layer i costs the FLOPs of a one-layer slice `layers=range(i, i + 1)` built on the meta device, so a memory
    kind's per-layer parts and its attention span (`mean_attended_len`: xl's and lamemo's memory, rmt's memory
    tokens) count as the model counts them. rmt's blocks also run its 2 K read / write memory tokens, so its
    layer FLOPs scale by (T + 2 K) / T (as the planner's `block_tokens`);
  - the last stage adds the output projection and the loss: 2 D V per token forward, x 3 with backward (the slice
    that holds layer L - 1 holds the head, so its FLOPs include it);
  - the first stage adds the embedding: a table lookup and its scatter-add, D per token each way, no matmul FLOPs
    (flops_per_token does not count it either) and negligible next to a layer's ~24 D^2: counted as zero.
Communication is not modelled: every stage boundary sends the same activation, whatever the split.

The split minimises the largest stage cost over all contiguous splits into pp non-empty stages (exact dynamic
programming, O(pp L^2): L <= ~200 and pp <= 64 take well under a second); among the splits with that maximum it
takes the one with the smallest sum of squared stage costs (the others as even as the bottleneck allows), and of
those the one that puts layers on earlier stages.
"""

from __future__ import annotations

from memscale.config import Config, ModelConfig, parse_pp_layers

# Two costs within this relative distance are equal: they are sums of the same floats in different orders.
_REL_TOL = 1e-9


def stage_layers(cfg: Config, pp: int | None = None) -> list[int]:
    """Layers per stage, first to last: `parallel.pp_layers` when given (and pp is the config's own), otherwise
    the cost-balanced split (module doc). `pp` defaults to `cfg.parallel.pp`; the planner passes others."""
    pp = cfg.parallel.pp if pp is None else pp
    L = cfg.model.num_layers
    if not 1 <= pp <= L:
        raise ValueError(f"pp={pp} must be in [1, num_layers={L}]: every stage needs a layer")
    if pp == cfg.parallel.pp:
        explicit = parse_pp_layers(cfg.parallel.pp_layers, pp=pp, num_layers=L)
        if explicit is not None:
            return explicit
    return balanced_split(layer_costs(cfg.model, segment_len=cfg.data.segment_len), pp)


def stage_ranges(counts: list[int]) -> list[range]:
    """The contiguous layer range of each stage, from its layer counts."""
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def layer_costs(model: ModelConfig, *, segment_len: int) -> list[float]:
    """Forward + backward FLOPs per segment token of each layer, the head's counted with the last and the
    embedding's (zero) with the first (module doc)."""
    # ModelConfig is a mutable dataclass (unhashable): its repr keys the cache; equal configs give equal costs.
    key = (repr(model), segment_len)
    if key not in _COSTS:
        _COSTS[key] = _measure_layers(model, segment_len)
    return list(_COSTS[key])


_COSTS: dict[tuple[str, int], tuple[float, ...]] = {}


def _measure_layers(m: ModelConfig, segment_len: int) -> tuple[float, ...]:
    import torch

    from memscale.models.transformer import MemoryTransformer

    # rmt's blocks run [read memory; segment; write memory]: 2 K more tokens than the loss is taken over.
    K = m.memory.num_tokens
    block_scale = (segment_len + 2 * K) / segment_len if m.memory.kind == "rmt" else 1.0
    costs = []
    for i in range(m.num_layers):
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            one = MemoryTransformer(m, segment_len=segment_len, layers=range(i, i + 1))
        # The head: 2 D V per token forward, x 3 with backward.
        head = 6.0 * one.head.weight.numel() if one.head is not None else 0.0
        costs.append((one.flops_per_token() - head) * block_scale + head)
    return tuple(costs)


def balanced_split(costs: list[float], pp: int) -> list[int]:
    """Contiguous non-empty split of `costs` (one per layer) into `pp` stages minimising the largest stage sum,
    then the sum of squared stage sums, then preferring layers on earlier stages (module doc)."""
    L = len(costs)
    if not 1 <= pp <= L:
        raise ValueError(f"pp={pp} must be in [1, {L}]: every stage needs a layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:  # layers a .. b - 1
        return prefix[b] - prefix[a]

    # best[p][i]: the smallest possible largest stage over layers 0 .. i - 1 cut into p stages.
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for p in range(1, pp + 1):
        for i in range(p, L - (pp - p) + 1):
            best[p][i] = min(max(best[p - 1][j], cost(j, i)) for j in range(p - 1, i))
    bound = best[pp][L] * (1 + _REL_TOL)
    # Under that bound, the smallest sum of squares; sq[p][i] over layers 0 .. i - 1 in p stages.
    sq = [[inf] * (L + 1) for _ in range(pp + 1)]
    cut = [[0] * (L + 1) for _ in range(pp + 1)]
    sq[0][0] = 0.0
    for p in range(1, pp + 1):
        for i in range(p, L - (pp - p) + 1):
            # j from the largest down: among equal sums the last stage stays shortest (layers go earlier).
            for j in range(i - 1, p - 2, -1):
                c = cost(j, i)
                if c > bound or sq[p - 1][j] == inf:
                    continue
                v = sq[p - 1][j] + c * c
                if v < sq[p][i] * (1 - _REL_TOL):
                    sq[p][i], cut[p][i] = v, j
    counts, i = [], L
    for p in range(pp, 0, -1):
        j = cut[p][i]
        counts.append(i - j)
        i = j
    counts.reverse()
    assert sum(counts) == L and min(counts) >= 1, counts
    return counts
