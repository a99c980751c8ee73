"""Test stand-in for `torchvision.models.optical_flow` (see tests/standins/README.md)."""

from _ondevice_standin import module_getattr

__getattr__ = module_getattr(__name__)
