"""cemabench: a benchmark harness for cloud-edge test-time adaptation."""

__version__ = "0.1.0"
