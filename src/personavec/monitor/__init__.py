"""Monitoring: projections of conversations, the live per-token monitor, and the paper's monitoring experiment."""
