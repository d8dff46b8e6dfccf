"""Metric modules for `evaluate`, shipped with loraforge (hub metric names do not load offline)."""
