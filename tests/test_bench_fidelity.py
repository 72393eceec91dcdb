"""The fidelity benchmark's bookkeeping (no training): what is left, and what it should cost."""

from __future__ import annotations

from bench import fidelity as F


def finished(task: str, method: str, seed: int, lr: float, steps: int, cpu_s: float) -> dict:
    return F.spec(task, method, seed, lr, steps) | {"score": 50.0, "cpu_s": cpu_s}


def test_a_jobs_cost_is_its_steps_at_the_per_step_cost_of_its_method_and_task():
    done = {F.run_key(r): r for r in [finished("rte", "lora", 0, 1e-3, 600, 600.0),
                                      finished("rte", "lora", 0, 2e-3, 600, 1200.0),
                                      finished("sst2", "full", 0, 1e-4, 600, 60.0)]}
    assert F.estimated_cpu_s(F.spec("rte", "lora", 1, 5e-4, 1200), done) == 2 * 1.5 * 600
    # no run of its own method and task: the mean per-step cost of every run (1, 2 and 0.1 s)
    assert abs(F.estimated_cpu_s(F.spec("mrpc", "adapter", 1, 1e-3, 300), done) - 300 * 3.1 / 3) < 1e-9
    assert F.estimated_cpu_s(F.spec("mrpc", "adapter", 1, 1e-3, 300), {}) == 300.0


def test_pending_runs_are_the_whole_protocol_before_any_and_shrink_as_runs_land():
    tasks, seeds = F.TASKS, F.REPORT_SEEDS
    pending = F.pending_jobs({}, tasks, seeds, F.BASE_STEPS)
    grid = sum(len(F.LR_GRID[m]) for m in F.METHODS) * len(tasks)
    report = len(seeds) * len(tasks) * (2 * len(F.METHODS) - 1)  # 1x for all, 2x but for full
    curve = len(seeds) * len(F.CURVE_TASKS) * 2 * len(F.CURVE_STEPS)
    assert len(pending) == grid + report + curve
    first = finished(tasks[0], "lora", F.GRID_SEED, F.LR_GRID["lora"][0], F.BASE_STEPS, 100.0)
    assert len(F.pending_jobs({F.run_key(first): first}, tasks, seeds, F.BASE_STEPS)) == len(pending) - 1
