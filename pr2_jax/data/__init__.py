"""Procedurally generated tasks (no data set can be downloaded on our machines)."""
