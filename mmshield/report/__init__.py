"""Run bookkeeping and reporting: the SQLite run store and self-contained HTML reports.

>>> store = RunStore("runs/mmshield.db")                        # doctest: +SKIP
>>> run = store.create_run(config, dataset="builtin")           # doctest: +SKIP
>>> store.log_round(run.run_id, 1, {"test_accuracy": 0.8})      # doctest: +SKIP
>>> store.finish_run(run.run_id, {"accuracy": 0.8})             # doctest: +SKIP
>>> render_report(store, run.run_id)                            # doctest: +SKIP

Importing this package does not import matplotlib; plotting modules load on first render.
"""

from mmshield.report.html import PLOT_NAMES, format_runs_table, render_report
from mmshield.report.store import DEFAULT_DB, SCHEMA_VERSION, RunInfo, RunStatus, RunStore

__all__ = [
    "DEFAULT_DB",
    "PLOT_NAMES",
    "SCHEMA_VERSION",
    "RunInfo",
    "RunStatus",
    "RunStore",
    "format_runs_table",
    "render_report",
]
