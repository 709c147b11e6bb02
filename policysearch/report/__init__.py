"""Reports: the run summary, policy export and policy-file evaluation, the HTML report
(:func:`build_report`, extra ``report``) and optuna-dashboard (:func:`serve`, extra ``dashboard``)."""
from policysearch.report.dashboard import annotate, dashboard_target, serve, serving
from policysearch.report.html import build_report
from policysearch.report.text import check_policy_file, evaluate_policy_file, export_run, summary_text

__all__ = [
    "annotate",
    "build_report",
    "check_policy_file",
    "dashboard_target",
    "evaluate_policy_file",
    "export_run",
    "serve",
    "serving",
    "summary_text",
]
