"""What the trainer writes into ``--output-dir``: every file whole or not at all, checkpoints with a
checksum, and a one-line :class:`TrainError` (not a traceback) when the disk is full or the folder
unusable."""
import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from typing import BinaryIO, Callable, Dict

import numpy as np
import torch

from pcd_kernels.train.errors import TrainError


# The key under which atomic_save stores the payload's checksum.
CHECKSUM = "sha256"

# The names temporary_path gives: only files named so are ever removed as stale.
TEMPORARY = re.compile(r".+\.tmp-(\d+)")


def temporary_path(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def reporting_write_errors(path: str):
    """Turns an ``OSError`` (no space left, a read-only disk, ...) into a one-line TrainError."""
    try:
        yield
    except OSError as error:
        raise TrainError(f"cannot write {path}: {error.strerror or error}; fix that, then --resume continues "
                         "from the last checkpoint") from error


def prepare_output_dir(folder: str) -> None:
    """Creates ``folder`` and checks that files can be written there: the command line calls it
    before any long preparation, so an unusable ``--output-dir`` costs no time."""
    try:
        os.makedirs(folder, exist_ok=True)
        # Writing is the sure test: os.access trusts permission bits that ACLs, network file systems
        # and root's privileges overrule.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        if os.path.exists(folder) and not os.path.isdir(folder):
            why = "it is a file"
        elif isinstance(error, (NotADirectoryError, FileExistsError)):
            why = "a folder on its path is a file"
        else:
            why = error.strerror or str(error)
        raise TrainError(f"--output-dir {folder}: cannot write there ({why}); choose another folder") from error


def remove_stale_temporaries(folder: str) -> None:
    """Removes the temporary files that writers killed mid-write left in ``folder`` (not below it).
    Call it before this run writes there. A file whose writer (the pid in its name) still runs on
    this machine is left alone: another run may be writing into the same folder."""
    with reporting_write_errors(folder):
        for entry in os.scandir(folder):
            match = TEMPORARY.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _running(int(match.group(1))):
                os.remove(entry.path)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this run's own leftovers (a pid reused by a later start)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` whole or not at all: ``write`` fills a temporary file in the same folder, which
    then replaces ``path``. On any failure the temporary file is removed and ``path`` is unchanged."""
    tmp = temporary_path(path)
    try:
        with reporting_write_errors(path):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                # Without this a crash soon after the rename can leave an empty file in place of
                # the previous one: the rename may reach the disk before the data. Some network
                # and FUSE file systems cannot sync at all (EINVAL, ENOTSUP): write without it there.
                try:
                    os.fsync(f.fileno())
                except OSError as error:
                    if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
                        raise
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(payload: Dict, path: str) -> None:
    """``torch.save`` of ``payload`` through :func:`atomic_write`, with its :func:`checksum` under
    ``CHECKSUM`` for :func:`verify_checksum`."""
    atomic_write(path, lambda f: torch.save({**payload, CHECKSUM: checksum(payload)}, f))


def checksum(payload) -> str:
    """sha256 of what ``payload`` holds: every tensor's and array's bytes, dtype and shape, and every
    other value's repr, in order. It sums the loaded objects rather than the file, so the file stays
    a plain ``torch.save`` dict (``torch.load`` reads it as before) and the sum does not depend on
    how a torch version lays the file out."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, np.ndarray) and value.dtype != object:  # (object arrays hold pointers)
            digest.update(f"array {value.dtype} {value.shape}\n".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, np.ndarray):
            digest.update(f"object array {value.shape}\n".encode())
            add(value.tolist())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key, item in value.items():
                add(key)
                add(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}\n".encode())
            for item in value:
                add(item)
        else:
            digest.update(f"{type(value).__name__} {value!r}\n".encode())

    add(payload)
    return digest.hexdigest()


def verify_checksum(loaded, path: str):
    """What ``torch.load`` read from a file :func:`atomic_save` wrote, without its checksum; a
    TrainError when the contents do not match it (torch.load itself checks no tensor bytes). A dict
    without a checksum, written before checkpoints had one, is returned unverified."""
    if isinstance(loaded, dict) and CHECKSUM in loaded:
        expected = loaded.pop(CHECKSUM)
        if checksum(loaded) != expected:
            raise TrainError(f"{path} is corrupted: its contents do not match the sha256 saved with them (a damaged "
                             "disk or copy); restore a good copy, or delete it to start again")
    return loaded


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


__all__ = ["atomic_save", "atomic_write", "checksum", "prepare_output_dir", "remove_stale_temporaries",
           "reporting_write_errors", "temporary_path", "verify_checksum", "write_json", "write_text"]
