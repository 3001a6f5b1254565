"""The lab's fixtures: the guest image (once per run) and a real lab per test module, always torn down."""
from __future__ import annotations

import pytest

from labtools import running_lab


@pytest.fixture(scope="session")
def guest_image():
    from kvmotion_lab.image.build import build_image

    return build_image(log=lambda m: None)


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 2) as info:
        yield info
