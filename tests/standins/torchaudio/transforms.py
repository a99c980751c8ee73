"""Test stand-in for `torchaudio.transforms` (see tests/standins/README.md)."""

from _ondevice_standin import module_getattr

__getattr__ = module_getattr(__name__)
