"""The measurement engine shared by the live callbacks and the checkpoint replay, and its TensorBoard view."""

from negmonitor.monitoring.engine import Measurement, MonitorSettings, MonitorState, take_measurement

__all__ = ["Measurement", "MonitorSettings", "MonitorState", "take_measurement"]
