"""Test stand-in for `torchvision.utils` (see tests/standins/README.md)."""

from _ondevice_standin import module_getattr

__getattr__ = module_getattr(__name__)
