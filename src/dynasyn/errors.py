"""Errors the command line turns into one clear line and exit status 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message names what is wrong and how to fix it (one line)."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message says what was kept."""
