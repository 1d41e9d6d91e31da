"""Writing files so that no failure loses what is already on disk, and every failure reads as one
line naming the file.

A file is either replaced whole (:func:`write_atomic`: a temporary file beside it, fsynced,
renamed over it, so a crash or a full disk leaves the old content or the new, never a mixture)
or grown by appended lines (:func:`append_text`; a line a crash cut short is the last one, which
its reader drops). A write that fails (a full disk, a permission, a read-only file system) raises
:class:`~hfedmoe.foundation.errors.WriteError` naming the file and the cause
(:func:`writing`), so the command prints one line and exits 2, and once the cause is gone the
run resumes from what it had written.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hfedmoe.foundation.errors import WriteError

#: how libraries that are not Python (safetensors) word an OS error in their own exceptions
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def writing(path: Path | str, *also: type[Exception]) -> Iterator[None]:
    """Report a failed write of ``path`` inside the block as a ``WriteError`` naming it and the
    cause, e.g. ``cannot write 'runs/x/metrics.jsonl': no space left on device``.

    ``also``: exception types besides ``OSError`` that a library raises for a failed write
    (safetensors' ``SafetensorError``, whose text carries the OS error's number).
    """
    try:
        yield
    except (OSError, *also) as exc:
        raise WriteError(f"cannot write '{path}': {cause(exc)}") from exc


def cause(exc: BaseException) -> str:
    """The operating system's words for ``exc`` ('no space left on device'), else its text."""
    code = getattr(exc, "errno", None)
    if code is None and (match := _OS_ERROR_CODE.search(str(exc))):
        code = int(match.group(1))
    text = os.strerror(code) if code else str(exc)
    return text[:1].lower() + text[1:]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: a crash or a failed write at any moment leaves the
    old content or the new."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` and wait until it is on disk."""
    with writing(path), path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
