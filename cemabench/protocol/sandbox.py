"""Writes confined to one folder, with Linux Landlock: what a half's process (``--isolate``) may change on disk.

A process of the same OS user can write every file the harness can: the results store, the training-artefact cache,
the dataset caches. Landlock (Linux 5.13 and later, unprivileged) lets a process give up rights for itself and
everything it starts: :func:`confine_writes` leaves reading and executing as they were and forbids creating, writing,
truncating, renaming, linking or removing any file outside the folders it is given. The rules are the kernel's; no
code in the process can lift them afterwards.

The syscalls are called through ctypes (numbers 444-446 on every architecture Linux gives them); the ruleset's
fields are those of ``linux/landlock.h``.
"""
from __future__ import annotations

import ctypes
import os
import struct

CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

WRITE_FILE = 1 << 1
REMOVE_DIR, REMOVE_FILE = 1 << 4, 1 << 5
# making a character device, a folder, a file, a socket, a fifo, a block device, a symbolic link
MAKE = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
REFER = 1 << 13  # ABI 2: link or rename across folders
TRUNCATE = 1 << 14  # ABI 3


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi() -> int:
    """The Landlock ABI version this kernel offers, 0 when it offers none (or this is not Linux)."""
    try:
        version = _libc().syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(0, int(version))


def _call(libc, number: int, *args) -> int:
    result = libc.syscall(number, *args)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"landlock syscall {number}: {os.strerror(error)}")
    return int(result)


def confine_writes(allowed: list[str]) -> str:
    """Forbid this process and its children to change any file outside ``allowed`` (folders, kept writable with
    everything beneath them). Returns what was applied, e.g. ``landlock ABI 7``, or ``none (...)`` saying why
    nothing was."""
    version = abi()
    if version < 1:
        return "none (this kernel has no Landlock: Linux 5.13 or later enables it)"
    handled = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE | (REFER if version >= 2 else 0) | (
        TRUNCATE if version >= 3 else 0)
    libc = _libc()
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled))  # struct landlock_ruleset_attr, fs rights only
    ruleset = _call(libc, CREATE_RULESET, attr, ctypes.c_size_t(8), ctypes.c_uint32(0))
    try:
        for folder in allowed:
            fd = os.open(folder, os.O_PATH | os.O_CLOEXEC)
            try:  # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } (packed)
                beneath = ctypes.create_string_buffer(struct.pack("=Qi", handled, fd))
                _call(libc, ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), beneath,
                      ctypes.c_uint32(0))
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        _call(libc, RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return f"landlock ABI {version}"
