"""Stockade: a per-node network-policy enforcer."""

__version__ = "0.1.0"
