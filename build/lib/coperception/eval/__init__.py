"""Evaluation: AP (global-sort protocol), communication volume, latency."""
