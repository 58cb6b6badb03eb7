"""The host agent: registers with the vault, sends heartbeats (inventory, item reports, recovery
points), runs the vault's commands (protect, cycle, resync, retention, unprotect,
update_settings) with the replication engine, and — on a recovery-site host — serves the
recovery store over mTLS and keeps replicas hydrated.

Modules: :mod:`.registration` (identity, trust on first contact), :mod:`.daemon` (the loop),
:mod:`.link` (the agent routes), :mod:`.state` (files that make restarts resume),
:mod:`.storeservice` (secondary store server + hydration), :mod:`.failover` (the host's half
of failover jobs), :mod:`.process` (the agent as a process: what ``drsite agent register|run``
call), :mod:`.testing` (a fake vault for tests). See
``design.md``.
"""
