"""Tests mirror the package: unit/<package>/test_<module>.py, whole-daemon scenarios in system/,
the docs checked against the code in docs/. Real peers at every boundary (conftest.py)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
