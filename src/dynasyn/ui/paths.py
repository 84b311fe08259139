"""Run names typed or picked in the browser, mapped to folders directly under ``--runs-dir``.

A name is one path component of letters, digits, ``_``, ``-`` and ``.`` (not starting with a
dot), so nothing the browser sends can point outside the runs directory: no separators, no
``..``, no absolute paths, and a symlink under the runs directory that leads out is refused too.
"""

from __future__ import annotations

import re
from pathlib import Path

from dynasyn.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A run name: one safe path component, at most 64 characters."""

MASKS = "masks"
"""The scene the UI made (uploaded / brushed / from class names), inside the run directory, as
for ``dynasyn train PHOTO --classes …`` (training copies it into ``RUN/scene``)."""
AUGMENTED = "augmented"
"""The augmented directory of the run (as ``dynasyn personalize`` writes it)."""
UI_DIR = "ui"
"""The UI's own files inside a run: job specs, logs, results, training samples."""


class RunsDir:
    """The ``--runs-dir`` folder: every path the UI reads or writes is a run folder inside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, name: str | None) -> Path:
        """The folder of run ``name`` (it need not exist yet).

        Raises:
            InputError: an empty or unsafe name, or one whose folder resolves outside the runs
                directory (a symlink).
        """
        name = (name or "").strip()
        if not name:
            raise InputError("no run name: type one (letters, digits, _ - .) or pick a run")
        if not NAME.match(name):
            raise InputError(f"run name {name!r} is not allowed: use letters, digits, _ - . "
                             "(at most 64, not starting with a dot); no / or ..")
        path = self.root / name
        if path.resolve().parent != self.root:
            raise InputError(f"run {name!r} points outside the runs directory; pick another name")
        return path

    def names(self) -> list[str]:
        """Run folders under the runs directory, newest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir()
                if p.is_dir() and NAME.match(p.name) and p.resolve().parent == self.root]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def trained(self) -> list[str]:
        """Names of finished runs (``run.json`` present): those generate / evaluate can use."""
        from dynasyn.rundir import RUN_INFO

        return [n for n in self.names() if (self.root / n / RUN_INFO).is_file()]
