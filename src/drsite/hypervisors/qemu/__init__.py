"""QEMU/KVM data plane: a QMP client, an NBD client, the QEMU storage daemon runner, the
dirty-bitmap + fleecing change-tracking cycle, and :class:`~.driver.QemuHypervisor`, the
``HypervisorDriver`` for QEMU VMs (see ``design.md``)."""
