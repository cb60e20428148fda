"""Core library of the replication suite: pure, framework-free building blocks.

Similarity, search, metrics, replication statistics, robust image I/O and
reporting live here; Lightning modules, datamodules and callbacks only
orchestrate them.
"""

__version__ = "0.1.0"
