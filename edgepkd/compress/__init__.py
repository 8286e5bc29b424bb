"""Compression and export: formats (``formats``) and targets (``export/*.yaml``), one exporter per format,
verification of every artifact in its own runtime through the runtime adapters (``runtimes``: numpy and one
runtime, which the device runner uses too), and the manifest that lets a device deploy a file without edgepkd."""
