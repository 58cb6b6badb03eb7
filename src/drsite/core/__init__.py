"""Pure domain: entities, enums, state machines, policy maths, errors.

Nothing in this package performs I/O or reads the clock; callers pass time in.
"""
