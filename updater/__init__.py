"""rpi-ab-updater: over-the-air A/B updates for Raspberry Pi fleets."""

__version__ = "0.1.0"
