"""Failover: network mapping (``network``), images for recovery VMs (``images``), the wire form
of what the vault sends agents (``wire``) and the actions — test/planned/unplanned failover,
commit, cancel, change of point, re-protect, failback (``actions``). See ``design.md``.

The split-brain guard (generation records) lives in :mod:`drsite.store.generation`: the
replication engine checks it, and it depends on nothing but the store contract.
"""
