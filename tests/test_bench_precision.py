"""The benchmarks' precision guard: a bf16 protocol refuses a CPU that would emulate bf16."""

from __future__ import annotations

import pytest

from adamix_zoo import runtime
from bench import federation, report


def test_a_bf16_benchmark_exits_naming_the_cpu_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(SystemExit, match="bench/fidelity.py runs in bf16 autocast.*no fast bf16 matmul"):
        report.require_fast_bf16("bf16", "bench/fidelity.py")
    report.require_fast_bf16("fp32", "bench/fidelity.py")  # an fp32 protocol runs anywhere
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    report.require_fast_bf16("bf16", "bench/fidelity.py")  # AMX or AVX-512 bf16: runs


def test_federation_runs_keep_the_pinned_precision_unless_a_diagnosis_or_the_report_overrides_it():
    fp32 = next(name for name, overrides in federation.DIAGNOSES.items() if overrides.get("precision") == "fp32")
    assert federation.job_precision(federation.job("diagnose", fp32, 0, {})) == "fp32"
    assert federation.job_precision(federation.job("select", "federated", 0, {})) == federation.PRECISION == "bf16"
    for side in ("federated", "centralized", "exact", "ranks"):
        report_run = federation.report_job(side, 0, {})
        assert federation.job_precision(report_run) == federation.REPORT_SETTINGS["precision"] == "fp32"
        # the report's settings are part of a run's key: earlier report runs are not taken for these
        assert federation.run_key(report_run) != federation.run_key(federation.job("report", side, 0, {}))
