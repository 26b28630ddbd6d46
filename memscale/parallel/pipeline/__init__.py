"""Pipeline parallelism over segments (DESIGN.md §3): schedules as data, checked before they run.

schedule.py   the action IR (F, B, activation / memory / memory-gradient transfers, STEP), strings like `1F3.2`,
              CSV dump and load, `ScheduleSpec` and `generate`, `format_order` (a step x rank table)
runtime.py    `PipelineRuntime(stage, spec, group=...).run(schedule, batches, states)`: this rank's row of a checked
              schedule on its stage (a MemoryTransformer slice) over batched p2p; equals run_window on one process
simulate.py   `simulate(schedule, spec, CostModel)`: every dependency (including segment t -> t + 1 through the
              memory), deadlocks, matched transfers; makespan, bubble, peak activation and memory-state bytes per
              rank; `SimResult.format_timeline` (a time x rank table)

Pipeline schedules. A rank's streams are split into G stream groups and a micro-batch is (group, segment); the
segments of one group go through the pipe in order, because each reads the memory the previous one wrote. The
memory kind's `topology` decides where that memory lives (`spec_for_kind` reads it off the kind's class):

  - per layer (xl, lamemo, infinity): each stage keeps its layers' memory, so segment t + 1 may enter stage s as
    soon as segment t has left it, and consecutive segments follow each other through the pipe (1F1B over the
    G x S micro-batches of a step);
  - global (rmt, memformer): the last stage writes the memory and sends it to the stages that read it (rmt's
    first stage, whose memory tokens then ride in the activations; every stage for memformer, whose slots every
    layer reads) before the group's next segment enters. G >= P groups, taken round robin, keep the pipe full
    (`ScheduleSpec` refuses fewer).

Gradient through memory follows memscale/train/bptt.py: `detached` backpropagates each segment alone (1F1B);
`truncated` and `replay` backpropagate a window of k segments from its last segment to its first, each waiting for
the memory gradient of the next (per layer: on the same stage; global: sent from the reading stages back to the
last stage), and nothing crosses a window. `replay` has the same dependencies as `truncated` but keeps per segment
only the stage input and the memory state at its start, and recomputes the segment inside its backward.

One stage per rank: no virtual (interleaved) stages, and no split of the backward into input and weight gradients
(torch's I / W); both could be added as actions without changing the checks' structure. runtime.py executes these
lists on real stages over p2p (`PipelineRuntime`); memscale/train/pipeline.py runs them in `memscale train`
(`parallel.pp` > 1).

    >>> from memscale.parallel.pipeline.schedule import ScheduleSpec, generate, format_order
    >>> from memscale.parallel.pipeline.simulate import CostModel, simulate
    >>> spec = ScheduleSpec(num_stages=4, num_groups=4, num_segments=8, bptt_segments=4,
    ...                     memory_grad="replay", topology="global")
    >>> result = simulate(generate(spec), spec, CostModel.uniform(4))
    >>> round(result.bubble, 3)
    0.129
"""
