"""(7c) What the console's figures cost a task: Redis CPU of its scripts, with and without them.

The microbenchmark of bench/figures_cost.py, in the run: the same tasks through the real
task_submit, task_start and task_finish on a redis-server of its own, alternating the shipped
scripts with copies whose figure helpers do nothing, and Redis's own CPU time per task
(`INFO commandstats`). No model server is involved: the "direct" column is the scripts without
the figures, the dispatcher's is with them.
"""

from __future__ import annotations

from bench.figures_cost import measure, summary
from bench.progress import say
from bench.scenarios.context import Context
from bench.table import Row

# Target: the figures add at most this much Redis CPU to a task (its three scripts).
ADDED_USEC_TARGET = 40.0


def run(ctx: Context) -> None:
    tasks = 2_000 if ctx.plan.smoke else 20_000
    say(f"figures: {tasks} tasks a round through the scripts, with and without the figures ...")
    shipped, bare = measure(tasks=tasks, rounds=1 if ctx.plan.smoke else 3)
    with_figures, without = summary(shipped, bare)
    added = with_figures - without
    say(f"  {without:.1f} -> {with_figures:.1f} us of Redis CPU per task (+{added:.1f} us)")
    ctx.rows.append(
        Row(
            key="figures_cost",
            scenario="console figures: a task's scripts (submit, start, finish), 16 a call",
            measure="Redis CPU per task (best round); direct = the scripts without figures",
            direct=f"{without:.1f} us",
            dispatcher=f"{with_figures:.1f} us (+{added:.1f})",
            ratio=f"{with_figures / without:.2f}" if without else "-",
            target=f"+<= {ADDED_USEC_TARGET:g} us",
            met=added <= ADDED_USEC_TARGET,
            figures={"without_usec": without, "with_usec": with_figures},
        )
    )
