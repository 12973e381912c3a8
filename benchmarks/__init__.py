"""Benchmarks: scripts that print figures (run each as python benchmarks/NAME.py --help)."""
