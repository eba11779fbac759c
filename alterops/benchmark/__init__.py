"""Benchmark harness and cases (used by ``alterops bench`` and by ``bench/``)."""
from .harness import format_table, measure_ceilings, run_case, run_suite, select_cases, time_callable
from .registry import Case, Workload, cases, register

__all__ = ["Case", "Workload", "cases", "register", "run_suite", "run_case", "select_cases",
           "measure_ceilings", "time_callable", "format_table"]
