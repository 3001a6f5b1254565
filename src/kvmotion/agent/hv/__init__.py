"""Hypervisors behind one interface (:mod:`kvmotion.agent.hv.base`); QEMU in :mod:`kvmotion.agent.hv.qemu`."""
