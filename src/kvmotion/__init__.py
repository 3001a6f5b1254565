"""kvmotion: vMotion for QEMU/KVM."""

__version__ = "0.1.0"
