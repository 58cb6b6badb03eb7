"""The vault: drsite's control plane (REST API, state database, job engine, scheduler, health).

Only the vault writes its database; agents report through heartbeats and receive commands in
the heartbeat reply. Start it with :func:`drsite.vault.server.run_vault` (a process) or build the
ASGI app in-process with :func:`drsite.vault.app.create_app`.
"""
