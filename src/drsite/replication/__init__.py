"""Replication engine: planner (what to do next), driver (attempts, steps, retry), resync, report."""
