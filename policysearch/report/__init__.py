"""Reports: the run summary, policy export and policy-file evaluation."""
from policysearch.report.text import check_policy_file, evaluate_policy_file, export_run, summary_text

__all__ = ["check_policy_file", "evaluate_policy_file", "export_run", "summary_text"]
