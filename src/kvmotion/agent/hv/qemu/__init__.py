"""QEMU/KVM as the agent's hypervisor."""
