"""Compression and export: targets (``export/*.yaml``), one exporter per format, verification of every
artifact in its own runtime, and the manifest that lets a device deploy a file without edgepkd."""
