"""Measurement: analytic FLOPs / parameters / bytes (``flops``); device latency and memory come later."""
