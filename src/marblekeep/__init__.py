"""marblekeep: a MarbleRun-compatible Coordinator for confidential computing."""

__version__ = "0.1.0"
