"""Watching served traffic: drift of a task's inputs against its training data."""

from cmtl.monitoring.drift import DriftMonitor, DriftReport, MonitorConfig, mmd_test

__all__ = ["DriftMonitor", "DriftReport", "MonitorConfig", "mmd_test"]
