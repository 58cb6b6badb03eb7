"""Fakes of the hypervisor driver contract, for fast unit tests beside the real drivers."""
