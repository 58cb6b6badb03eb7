"""In-memory and fault-injecting object stores for tests (never used in production paths)."""

from drsite.store.testing.faulty import Fault, FaultyObjectStore, SimulatedCrash
from drsite.store.testing.memory import MemoryObjectStore

__all__ = ["Fault", "FaultyObjectStore", "MemoryObjectStore", "SimulatedCrash"]
