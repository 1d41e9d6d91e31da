"""Writes that fail on demand: the disk fills up (or turns read-only) at a chosen write of a run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest


def fail_fsync(
    monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1, code: int = errno.ENOSPC
) -> None:
    """From the ``nth`` fsync of the file ``name`` on (or of its temporary: ``.name-*``, or
    ``name`` inside a temporary folder), fsync fails with ``code``, as the kernel reports data it
    could not store. Every write of a run that must survive a crash is fsynced, so this is that
    write failing on a full (``ENOSPC``) or read-only (``EROFS``) disk."""
    real, seen = os.fsync, []

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == name or path.name.startswith(f".{name}-"):
            seen.append(path)
            if len(seen) >= nth:
                raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
