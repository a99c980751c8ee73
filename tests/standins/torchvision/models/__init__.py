"""Test stand-in for `torchvision.models` (see tests/standins/README.md)."""

from _ondevice_standin import VERSION, module_getattr

__version__ = VERSION
__getattr__ = module_getattr(__name__)
