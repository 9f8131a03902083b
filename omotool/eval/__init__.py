"""Evaluation: reward and alignment tax side by side (tasks, statistics, reports)."""
