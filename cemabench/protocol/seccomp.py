"""A half's seccomp filter (``--isolate``): the system calls that Landlock (:mod:`cemabench.protocol.sandbox`) does not
confine and a half never needs, refused by the kernel for the half and everything it starts. The filter is a BPF
program over (number, architecture, arguments), assembled here from labelled instructions (:func:`_assemble`).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct

from cemabench.protocol.sandbox import PR_SET_NO_NEW_PRIVS, c_library

# seccomp: the kernel's filter of system calls, a BPF program over (number, architecture, arguments). The calls a
# half never needs that open a channel Landlock does not confine: a socket of any family, io_uring (which opens
# sockets of its own), System V shared memory, semaphores and message queues (the host's, shared by every process of
# this user, whatever the mount namespace), POSIX message queues (the same: a queue carried a batch from one half to
# the other), file locks (a lock on a file both halves may read, or on a range of it, is a bit the other half reads:
# ``flock``, and ``fcntl``'s record and open-file-description locks, :data:`LOCKS`), and the kernel's keyrings. And
# those that reach into another process of this user's (:data:`REACH`): tracing it, reading or writing its memory; and
# ``prlimit64`` on any process but itself (a half lowered the loop's file size limit, which ended the run, and its
# zygote's memory limit, which failed every later unit of every method).
CHANNELS = ("socket", "io_uring_setup", "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl",
            "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
            "mq_timedreceive", "mq_notify", "mq_getsetattr", "flock", "add_key", "request_key", "keyctl")
F_GETLK, F_SETLK, F_SETLKW, F_SETOWN, F_SETOWN_EX, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 5, 6, 7, 8, 15, 36, 37, 38
LOCKS = (F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW)
# a descriptor's owner, whom its I/O signals (SIGIO, whose default ends a process): set with fcntl F_SETOWN to the
# half's own process only, never with F_SETOWN_EX (a pointer the filter cannot read) or ioctl FIOSETOWN/SIOCSPGRP
OWNER_IOCTLS = (0x8901, 0x8902)
REACH = ("ptrace", "process_vm_readv", "process_vm_writev")
# under a memory limit (:func:`bound_memory`), the ways to memory that ``RLIMIT_DATA`` does not count (a hostile
# review held 3 GiB under --unit-memory 2G): a memfd's pages, a secret memfd's, a mapping moved or grown by ``mremap``
# (the stack's, grown to a GiB), BPF maps; ``mmap`` of shared anonymous memory or of a mapping that grows down (a
# stack's kind); and a new process, which would get a limit of its own (``clone`` without CLONE_THREAD, ``fork``,
# ``vfork``; ``clone3`` says ENOSYS, on which the C library starts threads with ``clone``)
UNCOUNTED = ("memfd_create", "memfd_secret", "mremap", "bpf")
FORKS = ("fork", "vfork")  # x86-64's own (aarch64 forks with clone only)
# signals: to its own process only (its threads included), whatever Landlock's version (ABI 6 scopes signals:
# Linux 6.12; before it a half could stop the zygote or the loop with SIGSTOP): the first argument of each call below
# names the process (a thread group), which must be the half's own (kill also takes 0 and minus its pid: its process
# group, which holds only it and its children where it leads the group, as a half does after setsid); ``tkill`` names a
# thread, which must be its main one; a pidfd (which may stand for any process) is neither opened nor signalled through
SIGNALS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
PIDFD = ("pidfd_open", "pidfd_send_signal")
_NAMES = (*CHANNELS, *REACH, "prlimit64", "seccomp", *UNCOUNTED, "mmap", "clone", "clone3", *SIGNALS, *PIDFD,
          "fcntl", "ioctl")
SYSCALLS = {"x86_64": {**dict(zip(_NAMES, (41, 425, 29, 30, 31, 67, 64, 65, 66, 220, 68, 69, 70, 71,
                                           240, 241, 242, 243, 244, 245, 73, 248, 249, 250,
                                           101, 310, 311, 302, 317, 319, 447, 25, 321, 9, 56, 435,
                                           62, 200, 234, 129, 297, 434, 424, 72, 16), strict=True)),
                       "fork": 57, "vfork": 58},
            "aarch64": dict(zip(_NAMES, (198, 425, 194, 196, 195, 197, 190, 193, 191, 192, 186, 189, 188, 187,
                                         180, 181, 182, 183, 184, 185, 32, 217, 218, 219,
                                         117, 270, 271, 261, 277, 279, 447, 216, 280, 222, 220, 435,
                                         129, 130, 131, 138, 240, 434, 424, 25, 29), strict=True))}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_BIT = 0x40000000  # x86-64's x32 system calls: another table of numbers, never Python's
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 1, 4
# BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, BPF_ALU|AND|K, RET|K
LOAD_WORD, JUMP_EQUAL, JUMP_AT_LEAST, AND, RETURN = 0x20, 0x15, 0x35, 0x54, 0x06
ALLOW, REFUSE, NO_SUCH_CALL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # RET_ALLOW; RET_ERRNO: EPERM, ENOSYS
FIRST_ARGUMENT = 16  # offset of args[0] in struct seccomp_data (its low word, on these little-endian machines)
MAP_SHARED_ANONYMOUS, MAP_GROWSDOWN, CLONE_THREAD = 0x21, 0x100, 0x10000


def _assemble(program: list) -> list[tuple[int, int, int, int]]:
    """BPF instructions from ``(op, k)``, ``(op, k, true label, false label)`` (a label: the next instruction when
    None) and ``label`` strings, which name the instruction after them."""
    at, position = {}, 0
    for item in program:
        if isinstance(item, str):
            at[item] = position
        else:
            position += 1
    out = []
    for item in program:
        if isinstance(item, str):
            continue
        op, k, *targets = item
        jumps = [0 if t is None else at[t] - len(out) - 1 for t in targets] or [0, 0]
        assert all(0 <= j < 256 for j in jumps), "a BPF jump goes forward by at most 255 instructions"
        out.append((op, *jumps, k))
    return out


def _filter(machine: str, bounded: bool = False) -> list[tuple[int, int, int, int]]:
    """The BPF program: a call from another architecture's table (32-bit x86's ``socketcall``, x32's) is refused
    whatever it is; of the native table, :data:`CHANNELS`, :data:`REACH` and :data:`PIDFD`, ``prlimit64`` unless its
    pid is 0 (the calling process: what ``setrlimit`` and ``getrlimit`` ask), :data:`SIGNALS` to any process but this
    one, ``fcntl``'s :data:`LOCKS` and an owner (F_SETOWN) other than this process or its group, and the ioctls that
    set an owner; ``bounded``, also the memory and processes that ``RLIMIT_DATA`` does
    not count (:data:`UNCOUNTED`); anything else is allowed."""
    numbers, pid = SYSCALLS[machine], os.getpid()
    refused = [*CHANNELS, *REACH, *PIDFD, *((*UNCOUNTED, *(f for f in FORKS if f in numbers)) if bounded else ())]

    def argument(n: int) -> tuple:
        return LOAD_WORD, FIRST_ARGUMENT + 8 * n

    program = [(LOAD_WORD, 4), (JUMP_EQUAL, AUDIT_ARCH[machine], None, "refuse"), (LOAD_WORD, 0),  # .arch, .nr
               *([(JUMP_AT_LEAST, X32_BIT, "refuse", None)] if machine == "x86_64" else []),
               *((JUMP_EQUAL, numbers[name], "refuse", None) for name in refused),
               (JUMP_EQUAL, numbers["prlimit64"], "prlimit", None), (JUMP_EQUAL, numbers["kill"], "kill", None),
               *((JUMP_EQUAL, numbers[name], "own process", None) for name in SIGNALS if name != "kill"),
               (JUMP_EQUAL, numbers["fcntl"], "fcntl", None), (JUMP_EQUAL, numbers["ioctl"], "ioctl", None)]
    if bounded:
        program += [(JUMP_EQUAL, numbers["clone3"], "no such call", None),
                    (JUMP_EQUAL, numbers["clone"], "clone", None), (JUMP_EQUAL, numbers["mmap"], "mmap", None)]
    program += [(RETURN, ALLOW),
                "prlimit", argument(0), (JUMP_EQUAL, 0, "allow", "refuse"),
                "fcntl", argument(1), *((JUMP_EQUAL, command, "refuse", None) for command in (*LOCKS, F_SETOWN_EX)),
                (JUMP_EQUAL, F_SETOWN, None, "allow"), argument(2), (JUMP_EQUAL, 0, "group", "group"),  # (always)
                "ioctl", argument(1), *((JUMP_EQUAL, command, "refuse", None) for command in OWNER_IOCTLS),
                (RETURN, ALLOW),
                "kill", argument(0), "group", (JUMP_EQUAL, 0, "allow", None),
                (JUMP_EQUAL, -pid & 0xFFFFFFFF, "allow", None), (JUMP_EQUAL, pid, "allow", "refuse"),
                "own process", argument(0), (JUMP_EQUAL, pid, "allow", "refuse")]
    if bounded:
        program += ["clone", argument(0), (AND, CLONE_THREAD), (JUMP_EQUAL, 0, "refuse", "allow"),
                    "mmap", argument(3), (AND, MAP_GROWSDOWN), (JUMP_EQUAL, 0, None, "refuse"),
                    argument(3), (AND, MAP_SHARED_ANONYMOUS), (JUMP_EQUAL, MAP_SHARED_ANONYMOUS, "refuse", "allow"),
                    "no such call", (RETURN, NO_SUCH_CALL)]
    return _assemble([*program, "allow", (RETURN, ALLOW), "refuse", (RETURN, REFUSE)])


def forbid_channels(bounded: bool = False) -> str:
    """Refuse this process (all its threads) and its children the system calls of :data:`CHANNELS` (they fail with
    EPERM): Landlock confines TCP and files, not UDP, netlink, a Unix socket that connects by path to a service of
    this user's (a Ray raylet, a Docker daemon), System V IPC, POSIX message queues or file locks (which another half,
    or the next unit, could read), or keyrings; nor the calls of :data:`REACH`, nor ``prlimit64`` on another process
    (:func:`_filter`), nor a signal to another process, directly or as a descriptor's owner (:data:`SIGNALS`; call it
    where this process leads its process group). A half needs none of them: its line to the loop is open before it is
    confined. ``bounded`` (under a memory limit, with :func:`bound_memory`): nor memory that the limit does not count,
    nor a new process (threads start as before). Returns what was applied, or ``channels open (...)``."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        return f"channels open (no seccomp filter for {machine})"
    program = _filter(machine, bounded)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in program))
    prog = ctypes.create_string_buffer(struct.pack("@HP", len(program), ctypes.addressof(filters)))
    libc = c_library()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # SPEC_ALLOW: where the kernel's Speculative Store Bypass mitigation is in its "seccomp" mode (the default before
    # Linux 5.16, still that of long-term distributions' kernels), a filter without it would also switch that
    # mitigation on for the half, whose compute then runs slower than the same compute in-process. It keeps what a
    # process holds from untrusted code that the process runs itself (a browser's scripts); a half holds nothing that
    # its method code may not read (no label, no store, not the other half)
    for flags in (SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_SPEC_ALLOW, SECCOMP_FILTER_FLAG_TSYNC):
        if libc.syscall(SYSCALLS[machine]["seccomp"], SECCOMP_SET_MODE_FILTER, flags, prog) == 0:
            break
        if ctypes.get_errno() != errno.EINVAL:  # (EINVAL: a kernel before 4.17, which knows no SPEC_ALLOW)
            return f"channels open (seccomp refused: {os.strerror(ctypes.get_errno())})"
    else:
        return f"channels open (seccomp refused: {os.strerror(ctypes.get_errno())})"
    return "no socket, System V or POSIX IPC, file lock, keyring, signal or reach into another process" + (
        "; memory bounded (no shared, memfd or growing mapping, no new process)" if bounded else "")


def bound_memory() -> None:
    """Under a data-size limit (``RLIMIT_DATA``), before :func:`forbid_channels` with ``bounded``: the stack's and
    the open files' limits fixed where they are (their hard limits lowered to their soft ones, which a process may
    raise up to the hard): the main stack grows under ``RLIMIT_STACK``, not the data limit, and every descriptor
    holds memory of the kernel's (a pipe's buffer). An unlimited stack is given 64 MiB."""
    for limit, otherwise in ((resource.RLIMIT_STACK, 64 << 20), (resource.RLIMIT_NOFILE, 1 << 16)):
        soft, _ = resource.getrlimit(limit)
        soft = otherwise if soft == resource.RLIM_INFINITY else soft
        resource.setrlimit(limit, (soft, soft))
