"""Lightning callbacks: add one to your ``Trainer`` and get emergence curves in TensorBoard and parquet records."""

from negmonitor.callbacks.monitor import (
    AblationMonitor,
    NegativeDifferentiationMonitor,
    PairSignMonitor,
    WassersteinMonitor,
    WeightDriftMonitor,
    find_hf_model,
)
from negmonitor.callbacks.schedule import Schedule, log_spaced_steps

__all__ = ["AblationMonitor", "NegativeDifferentiationMonitor", "PairSignMonitor", "WassersteinMonitor",
           "WeightDriftMonitor", "Schedule", "find_hf_model", "log_spaced_steps"]
