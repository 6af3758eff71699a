"""Figures and tables from MLflow alone (``python -m rayexp.report``; ``build_report``).

- ``runs``: the runs of a sweep read from MLflow, grouped into configs and series; Hessian results.
- ``figures``: loss curves with seed bands, LR sensitivity, MADA coefficients, spectra, 1-1 norms, gradients.
- ``html``: tables, the self-contained HTML page, ``build_report``.
- ``__main__``: the command line.
"""
from rayexp.report.figures import (BANDS, plot_block_spectra, plot_grad_norms, plot_heterogeneity,  # noqa: F401
                                   plot_l11, plot_loss_curves, plot_lr_sensitivity, plot_mada, plot_spectra,
                                   seed_band)
from rayexp.report.html import SECTIONS, Report, build_report, render_html, table_html, table_text  # noqa: F401
from rayexp.report.runs import (Config, HessianResult, RunRecord, SweepRuns, best_per_series,  # noqa: F401
                                best_table, group_configs, load_hessian, load_runs, varied_params)
