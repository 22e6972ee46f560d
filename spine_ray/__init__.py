"""spine-ray."""
__version__ = "0.1.0"
