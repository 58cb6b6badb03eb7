"""Recovery stores: the object-store contract, its backends, and the recovery-point format."""
