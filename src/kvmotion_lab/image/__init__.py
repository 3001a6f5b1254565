"""Tiny real Linux guest (Debian cloud kernel + busybox initramfs) for kvmotion tests.

See :mod:`kvmotion_lab.image.build` for the API and :mod:`kvmotion_lab.image.guest_init`
for the guest's serial/HTTP protocol.
"""

from kvmotion_lab.image.build import (
    BASE_CMDLINE,
    GuestImage,
    ImageBuildError,
    build_image,
    cached_image,
    default_cache_dir,
    kernel_cmdline,
)

__all__ = [
    "BASE_CMDLINE",
    "GuestImage",
    "ImageBuildError",
    "build_image",
    "cached_image",
    "default_cache_dir",
    "kernel_cmdline",
]
