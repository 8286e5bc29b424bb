"""Measurement on a device: profiles (``devices``), the standalone runner (``runner``: numpy and one runtime; it
opens artifacts with ``edgepkd.compress.runtimes``, the one file it travels to a device with), ``bench`` (latency,
RAM, storage and top-1 in the device's runtime, or estimated), ``pick`` (the most accurate export within the
budgets), the latency table for student design (``latency_table``) and the bench plot (``plot``).
FLOP counting is model accounting and lives in ``edgepkd.models.flops``."""
