"""Appliance: a batteries-included AI server for one box."""

__version__ = "0.1.0"
