"""Pipeline parallelism over segments (DESIGN.md §3): schedules as data, checked before they run.

schedule.py   the action IR (F, B, activation / memory transfers, STEP), strings like `1F3.2`, CSV, the
              generators (`generate(ScheduleSpec(...))`)
simulate.py   `simulate(schedule, spec, CostModel)`: dependencies, deadlocks, matched transfers; makespan, bubble,
              peak activation and memory-state bytes per rank
"""
