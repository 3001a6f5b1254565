"""The lab's fixtures: the guest images (once per run) and a real lab per test module, always torn down."""
from __future__ import annotations

import pytest

from labtools import running_lab


@pytest.fixture(scope="session")
def guest_image():
    from kvmotion_lab.image.build import build_image

    return build_image(log=lambda m: None)


@pytest.fixture(scope="session")
def debian_image():
    """The Debian 12 disk guest (``kvmotion image build --debian``), built once per machine, cached by recipe."""
    import time

    from kvmotion_lab.image.debian import build_debian_image
    from labtools import record_figure

    t0 = time.monotonic()
    img = build_debian_image(log=lambda m: None)
    record_figure("debian_image_build_cold_s", img.build_seconds, "s")
    record_figure("debian_image_build_or_cache_s", time.monotonic() - t0, "s")
    record_figure("debian_image_qcow2_mib", img.disk.stat().st_size / (1 << 20), "MiB")
    return img


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 2) as info:
        yield info
