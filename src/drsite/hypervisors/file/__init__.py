"""The embedded file-backed hypervisor: VMs are directories of sparse raw images, a running VM
is a guest process whose writes go through a tracked, copy-before-write block layer."""

from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.runtime import GuestRuntime
from drsite.hypervisors.file.vm import FileVm
from drsite.hypervisors.file.workload import WorkloadSpec

__all__ = ["FileHypervisor", "FileVm", "GuestRuntime", "WorkloadSpec"]
