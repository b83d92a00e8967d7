"""MLflow tracking and plots of a search."""

from unlearn_search.tracking.mlflow_tracking import (
    MLflowTracker,
    check_reachable,
    default_tracking_uri,
    resumed_tracking,
)
from unlearn_search.tracking.plots import study_plots

__all__ = ["MLflowTracker", "check_reachable", "default_tracking_uri", "resumed_tracking", "study_plots"]
