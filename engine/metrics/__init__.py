"""Prometheus/OpenMetrics export of the engine's counters (``--metrics ADDRESS:PORT``, docs/metrics.md).

Split by job: :mod:`address` parses the listen address (the profile loader uses it without importing
prometheus_client), :mod:`reading` copies the engine's figures on the engine's loop, :mod:`latency` folds
the resolver's latency samples into a cumulative histogram, :mod:`collector` turns a reading into metric
families, :mod:`server` serves them over HTTP off the packet path.
"""
