"""Device-targeted deployment: search the best shape for a target's budgets, then extract, export, validate,
bench and report in one resumable command."""

from .demo import deploy_demo
from .pipeline import STAGES, DeployOptions, deploy, load_manifest, prediction_errors, stage_dir
from .search import SearchResult, require_choice, search

__all__ = ["STAGES", "DeployOptions", "SearchResult", "deploy", "deploy_demo", "load_manifest",
           "prediction_errors", "require_choice", "search", "stage_dir"]
