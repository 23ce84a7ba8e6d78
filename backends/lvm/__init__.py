"""LVM logical volumes as exports: see driver.py."""

from .driver import LvmDriver

__all__ = ["LvmDriver"]
