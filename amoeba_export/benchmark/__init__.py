"""One benchmark harness for every backend: each measurement in a fresh subprocess, through the Runner contract."""

from .harness import bench_artifact, format_table

__all__ = ["bench_artifact", "format_table"]
