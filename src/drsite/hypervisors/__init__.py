"""Hypervisor drivers: the contract and its implementations (file, qemu)."""
