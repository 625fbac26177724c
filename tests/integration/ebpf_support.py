"""Shared pieces of the eBPF packet tests."""

from __future__ import annotations





