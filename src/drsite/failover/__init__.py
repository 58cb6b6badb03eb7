"""Failover: network mapping (``network``), the split-brain guard (``generation``), images for
recovery VMs (``images``) and the actions — test/planned/unplanned failover, commit, cancel,
change of point, re-protect, failback (``actions``). See ``design.md``.

Nothing is imported here: :mod:`drsite.replication.driver` imports ``failover.generation``, and
``failover.actions`` imports the replication engine.
"""
