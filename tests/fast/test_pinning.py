"""The pinning books' defaults and argument checks (no ComfyUI, no fake GPU)."""

from __future__ import annotations

import pytest

from ondevice.devices import memory_info
from ondevice.errors import InvalidArgumentError
from ondevice.pinning import _Books, set_pinned_limit


def test_default_cap_is_half_the_machines_ram() -> None:
    """Pinned memory cannot be paged out: by default ondevice pins at most half the RAM."""
    assert _Books().limit == memory_info("cpu")[1] // 2


def test_bad_cap_is_an_invalid_argument() -> None:
    """A cap that is not a non-negative int is refused with an OnDeviceError that is also a ValueError."""
    with pytest.raises(InvalidArgumentError, match="nbytes=-1"):
        set_pinned_limit(-1)
