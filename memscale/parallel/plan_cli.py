"""`memscale plan CONFIG`: print a layout's predicted step time, bubble and memory, or search a cluster's layouts.

    memscale plan configs/plan-7b.yaml                                  # the config's own layout (parallel.*)
    memscale plan configs/plan-70b.yaml --gpus 256 --interconnect ib-200 --top 5 --json plan.json

The cost model is memscale/parallel/plan.py; nothing is launched and no data is read (data.dir need not exist).
"""

from __future__ import annotations

import json
from dataclasses import replace

from memscale.config import ConfigError, load_config
from memscale.parallel.plan import (
    Cluster,
    Estimate,
    ModelShape,
    assumptions,
    config_layout,
    estimate,
    search,
    with_groups,
)
from memscale.utils.files import write_text_atomic

GB = 1e9


def _mem_line(e: Estimate, cluster: Cluster) -> str:
    m = e.memory
    stage = max(range(len(e.memory_per_stage)), key=lambda s: e.memory_per_stage[s].total)
    return (
        f"{m.total / GB:.1f} GB of {cluster.memory_bytes / GB:.0f} GB (stage {stage}): weights {m.weights / GB:.1f}, "
        f"grads {m.grads / GB:.1f}, optimizer {m.optimizer / GB:.1f}, activations {m.activations / GB:.1f}, "
        f"memory state {m.state / GB:.2f}, overhead {m.overhead / GB:.1f}"
    )


def _report(e: Estimate, cluster: Cluster) -> list[str]:
    p = e.parts
    return [
        f"  layout           {e.layout}  ({e.streams_per_rank} streams per dp rank)",
        f"  step time        {e.step_s:.3g} s  (per stage: compute {p['compute_per_stage']:.3g} s, tp comm "
        f"{p['tp_comm_per_stage']:.3g} s; dp exposed {p['dp_exposed']:.3g} s; optimizer {p['optimizer']:.3g} s)",
        f"  tokens/s         {e.tokens_per_s:,.0f}  (MFU {e.mfu:.2f})",
        f"  bubble           {100 * e.bubble:.1f}% ({e.pipeline})",
        f"  memory per rank  {_mem_line(e, cluster)}" + ("" if e.fits else "  -- DOES NOT FIT"),
    ]


def _table(rows: list[Estimate]) -> list[str]:
    head = (
        f"  {'#':>2}  {'layout':<52} {'step s':>8} {'tokens/s':>11} {'MFU':>5} {'bubble':>7} {'GB/rank':>8}"
    )
    out = [head]
    for i, e in enumerate(rows, 1):
        out.append(
            f"  {i:>2}  {str(e.layout):<52} {e.step_s:>8.3g} {e.tokens_per_s:>11,.0f} {e.mfu:>5.2f} "
            f"{100 * e.bubble:>6.1f}% {e.memory.total / GB:>8.1f}"
        )
    return out


def _write_json(path: str, data: dict) -> None:
    """Atomically: an existing file is never half-written."""
    write_text_atomic(path, json.dumps(data, indent=1))


def _parse_ks(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        ks = tuple(int(x) for x in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k {text} must be a comma-separated list of segment counts >= 1, e.g. 1,2,4")
    return ks


def run_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    shape = ModelShape.from_config(cfg)
    own = config_layout(cfg)
    streams = args.global_streams or cfg.data.num_streams * own.dp
    gpus = args.gpus or own.tp * own.pp * own.dp
    cluster = Cluster.make(
        args.gpu,
        num_gpus=gpus,
        gpus_per_node=args.gpus_per_node,
        interconnect=args.interconnect,
        gpu_memory_gb=args.gpu_memory,
    )
    k = cfg.train.bptt_segments
    params = f"{shape.num_params / 1e9:.2f}B" if shape.num_params >= 1e9 else f"{shape.num_params / 1e6:.2f}M"
    where = (
        "" if args.gpu == "cpu" else f", {cluster.gpus_per_node} per node, {cluster.inter.name} between nodes"
    )
    # The report is printed once complete (after the JSON is written): a reader that stops early (head) loses none.
    out = [
        f"memscale plan: {args.config} | {shape.kind} | {params} params | {streams} global streams x "
        f"{shape.segment_len}-token segments, k={k} per step ({streams * k * shape.segment_len:,} tokens) | "
        f"memory_grad={cfg.train.memory_grad}",
        f"cluster: {gpus} x {cluster.device.name}{where}",
    ]
    result: dict = {"config": str(args.config), "global_streams": streams, "num_gpus": gpus}
    if args.gpus is None:
        if streams % own.dp:
            raise ConfigError(f"--global-streams {streams} does not split over parallel.dp={own.dp}")
        e = _own_layout(shape, own, cluster, streams)
        out.append("the config's layout (parallel.*; G, the stream groups, chosen fastest that fits):")
        out += _report(e, cluster)
        if not e.fits:
            out.append(
                f"  it does not fit: {e.memory.total / GB:.1f} GB needed per rank; run with --gpus N to search"
            )
        result["layout"] = e.to_dict()
    else:
        found = search(shape, cluster, global_streams=streams, segments=_parse_ks(args.k), top=args.top)
        if not found.best:
            s = found.smallest
            raise ConfigError(
                f"no layout of {gpus} x {cluster.device.name} ({cluster.memory_bytes / GB:.0f} GB each) fits "
                f"{args.config}: the smallest needs {s.memory.total / GB:.1f} GB per GPU ({s.layout}); use more GPUs, "
                "a larger --gpu-memory or fewer --global-streams"
            )
        out.append(
            f"searched {found.considered} layouts, {found.fitting} fit; the fastest {len(found.best)} "
            "(re-estimated stage by stage):"
        )
        out += _table(found.best)
        out.append("best:")
        out += _report(found.best[0], cluster)
        result["best"] = [e.to_dict() for e in found.best]
        result["considered"], result["fitting"] = found.considered, found.fitting
    lines = assumptions(cluster)
    out.append("assumptions:")
    out += [f"  - {a}" for a in lines]
    result["assumptions"] = lines
    if args.json:
        _write_json(args.json, result)
        out.append(f"wrote {args.json}")
    print("\n".join(out))
    return 0


def _own_layout(shape: ModelShape, own, cluster: Cluster, streams: int) -> Estimate:
    """The config's layout with the number of stream groups G (not a config key) that is fastest among those that
    fit, the fewest on a tie; if none fits, the one that needs the least memory."""
    B = streams // own.dp
    first = with_groups(own, shape, B)
    tried = [
        estimate(shape, replace(first, groups=G), cluster, global_streams=streams)
        for G in range(first.groups, B + 1)
        if B % G == 0
    ]
    fits = [e for e in tried if e.fits]
    if fits:
        return min(fits, key=lambda e: (-float(f"{e.tokens_per_s:.3g}"), e.layout.groups))
    return min(tried, key=lambda e: e.memory.total)
