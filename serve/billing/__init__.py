"""Billing: one usage record per completed job (GPU-seconds per stage), and the usage endpoint's reads."""
