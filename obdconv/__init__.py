"""obdconv: convert container images to overlaybd block-device images."""

__version__ = "0.1.0"
