"""kvmotion_lab: the lab beside the product (network namespaces, guest image, benchmarks, demo).

It may import anything of kvmotion; nothing of kvmotion imports it (tests/unit/test_import_rules.py). Its commands:
`kvmotion-lab`, or `kvmotion lab|image|bench|demo` through the ``kvmotion.cli`` entry-point group.
"""
