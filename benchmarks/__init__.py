"""Benchmarks that put our figures beside the peers', measured in one run on one machine.

``python -m benchmarks`` (or ``make bench``) starts its own SQS server, workers and Dagster
instances, runs every scenario, prints one table and writes the same as JSON. Not part of
``make test``: the figures depend on the machine, the tests must not.
"""
