"""QEMU/KVM data plane: a QMP client, an NBD client, the QEMU storage daemon runner and the
dirty-bitmap + fleecing change-tracking cycle (see ``design.md``). Not yet a full
``HypervisorDriver`` (no inventory, power or VM creation)."""
