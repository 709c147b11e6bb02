"""Reports: the run summary, policy export and policy-file evaluation."""
from policysearch.report.text import evaluate_policy_file, export_run, summary_text

__all__ = ["evaluate_policy_file", "export_run", "summary_text"]
