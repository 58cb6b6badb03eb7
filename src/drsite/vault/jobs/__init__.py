"""Jobs: persisted long operations with ordered, resumable tasks, run inside the vault.

``plan`` names each kind's tasks, ``create`` starts jobs, ``protection`` and ``maintenance``
hold the task bodies, ``runner`` advances them (and resumes them after a vault restart).
"""
