"""A half's process (``--isolate``) confined with Linux Landlock and seccomp: what it may read and change on disk,
whom it may reach.

A process of the same OS user can read and write every file the harness can: the datasets and their labels, the results
store, the training-artefact cache, the dataset caches. Landlock (Linux 5.13 and later, unprivileged) lets a process
give up rights for itself and everything it starts: :func:`confine` forbids creating, writing, truncating, renaming,
linking or removing any file but those it is given, reading any file or listing any folder but those beneath the folders
it is given (:func:`readable`: the system's, Python's and the importable code's), TCP, and signals and abstract sockets
beyond the process's own children; and a seccomp filter (:func:`forbid_channels`) refuses what Landlock does not: every
new socket (UDP, a Unix socket connected by path), System V IPC and the keyrings. The rules are the kernel's; no code in
the process can lift them afterwards.

The syscalls are called through ctypes (numbers 444-446 on every architecture Linux gives them); the ruleset's fields
are those of ``linux/landlock.h``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct
import sys

CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
READ = READ_FILE | READ_DIR
REMOVE_DIR, REMOVE_FILE = 1 << 4, 1 << 5
# making a character device, a folder, a file, a socket, a fifo, a block device, a symbolic link
MAKE = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
REFER = 1 << 13  # ABI 2: link or rename across folders
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a file (not a folder) may allow
TCP = (1 << 0) | (1 << 1)  # ABI 4: bind, connect
SCOPES = (1 << 0) | (1 << 1)  # ABI 6: abstract Unix sockets, signals
CAPABILITY_SYSCALLS = {"x86_64": (125, 126), "aarch64": (90, 91)}  # capget, capset
CAPABILITY_VERSION_3 = 0x20080522


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


def confine(writable: list[str], readable: list[str] | None = None) -> str:
    """Forbid this process and its children to change any file but ``writable`` (device files such as /dev/null, or
    folders with everything beneath them), to read any file or list any folder but those beneath ``readable`` (and
    ``writable``; None leaves reading as it was), to use a device's ioctls but those of ``writable`` (ABI 5), to bind
    or connect TCP sockets (ABI 4), and to signal or reach the abstract Unix sockets of processes outside this one and
    its children (ABI 6). Returns what was applied, e.g. ``landlock ABI 7, reads confined``, or ``none (...)`` saying
    why nothing was."""
    version = abi()
    if version < 1:
        return "none (this kernel has no Landlock: Linux 5.13 or later enables it)"
    handled = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE | (REFER if version >= 2 else 0) | (
        TRUNCATE if version >= 3 else 0) | (IOCTL_DEV if version >= 5 else 0) | (READ if readable is not None else 0)
    net = TCP if version >= 4 else 0
    scoped = SCOPES if version >= 6 else 0
    libc = _libc()
    # struct landlock_ruleset_attr: handled_access_fs, then (ABI 4) handled_access_net, then (ABI 6) scoped
    fields = [handled] + ([net] if version >= 4 else []) + ([scoped] if version >= 6 else [])
    attr = ctypes.create_string_buffer(struct.pack(f"={len(fields)}Q", *fields))
    ruleset = _call(libc, CREATE_RULESET, attr, ctypes.c_size_t(8 * len(fields)), ctypes.c_uint32(0))
    try:
        for paths, rights in ((writable, handled), (readable or [], handled & READ)):
            for path in paths:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:  # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } (packed)
                    allowed = rights if os.path.isdir(path) else rights & FILE_RIGHTS
                    beneath = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd))
                    _call(libc, ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH), beneath,
                          ctypes.c_uint32(0))
                finally:
                    os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        _call(libc, RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return f"landlock ABI {version}" + (", reads confined" if readable is not None else "")


# the system's programs, libraries, settings and kernel files: what torch, NumPy and a GPU's driver read at run time
SYSTEM = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/sys",
          "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",  # of /dev no disk (root could read one)
          "/dev/nvidia-caps")  # and a MIG GPU's capabilities (its device nodes are the halves' writable files)


def _proc() -> list[str]:
    """Of ``/proc``, the kernel's own files (``cpuinfo``, ``meminfo``, ``sys``, ...) and this process's folder
    (``/proc/self`` leads there), not another process's: the loop's command line names its folders, and a half could
    rewrite its own for the other half to read, a channel beside the link."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [f"/proc/{os.getpid()}", *(f"/proc/{n}" for n in names if not n.isdigit()
                                     and not os.path.islink(f"/proc/{n}"))]


def _beneath(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


CODE = (".py", ".pyc", ".so", ".pyd")  # an import path folder's modules (an archive is code only as an entry itself)


def readable(path: list[str], hidden: list[str]) -> list[str]:
    """What a half may read, as real paths: the system's files (:data:`SYSTEM`, and of ``/proc`` the kernel's and this
    process's: :func:`_proc`) and Python's own folders whole (its
    library, the environment's site-packages); of the other import path entries (a project's source folder, a
    script's folder, the working directory under ``python -m``) only the code: modules, packages and distribution
    metadata (:func:`_code_in`), not the data or results beside it; the folders of the packages loaded (an editable
    install's, say), the files of the modules loaded on their own, and the folders a meta path finder maps. Less
    everything beneath ``hidden`` (a data root, the results folder, the caches, should one lie in such a folder): a
    folder that holds one is replaced by its entries, recursively, links left out, so that it can no longer be listed
    either."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    whole, code = {*SYSTEM, *_proc(), *prefixes}, set()
    for entry in path:
        real = os.path.realpath(entry or os.getcwd())  # "" is the working directory to the import system
        if any(_beneath(real, p) for p in prefixes):
            whole.add(real)
        elif os.path.isdir(real):
            code.update(_code_in(real))
        elif os.path.isfile(real):  # a zip archive of modules
            code.add(real)
    loaded = set()
    for name, module in list(sys.modules.items()):
        known = _LOADED.get(name)
        if known is None or known[0] is not module:  # (the zygote's modules are known to the halves it forks)
            top = sys.modules.get(name.partition(".")[0])
            folders = getattr(top, "__path__", None)  # a package: its folders; a module on its own: its file
            files = [getattr(module, "__file__", None)] if folders is None else list(folders)
            known = _LOADED[name] = (module, tuple(os.path.realpath(f) for f in files  # (torch.ops's is '_ops.py')
                                                   if isinstance(f, str) and os.path.isabs(f)))
        loaded.update(known[1])
    for finder in sys.meta_path:  # setuptools' editable finder: a module global MAPPING, top-level name -> folder
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", None)
        whole.update(v for v in mapping.values() if isinstance(v, str)) if isinstance(mapping, dict) else None
    hidden = sorted({os.path.realpath(h) for h in hidden})
    trusted = {os.path.realpath(r) for r in whole} | loaded  # Python's, the system's, what was imported
    code = {os.path.realpath(r) for r in code}
    code = {c for c in code if not any(_beneath(c, h) for h in hidden)}  # (what lies in a hidden folder stays there)
    kept: set[str] = set()
    for root in sorted(trusted | code, key=len):  # each once: a path beneath a folder kept (shorter) is covered by it
        if os.path.exists(root) and not any(parent in kept for parent in _and_above(root)):
            kept.add(root)
    seen: set[str] = set()
    return [p for root in sorted(kept) for p in _split(root, hidden, seen)]


_LOADED: dict[str, tuple] = {}  # module name -> (the module, the real paths it makes readable)


def _and_above(path: str):
    """``path`` and every folder above it."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _code_in(folder: str) -> list[str]:
    """An import path folder's code: its modules (:data:`CODE`), its packages (folders with an ``__init__.py``), its
    distributions' metadata (``*.dist-info``, ``*.egg-info``: a plugin's entry points) and its ``__pycache__``; no
    link, whatever its name."""
    def is_code(entry: os.DirEntry) -> bool:  # by name, so never a link (a "x.dist-info" link to a data root)
        if entry.is_symlink():
            return False
        if entry.is_dir():
            return (os.path.isfile(os.path.join(entry.path, "__init__.py")) or entry.name == "__pycache__"
                    or entry.name.endswith((".dist-info", ".egg-info")))
        return entry.is_file() and entry.name.endswith(CODE)

    try:
        with os.scandir(folder) as entries:
            return [entry.path for entry in entries if is_code(entry)]
    except OSError:  # a folder this user cannot list: Python finds nothing in it either
        return []


def _split(root: str, hidden: list[str], seen: set[str]) -> list[str]:
    """``root``, or where it holds a hidden path, its entries but the hidden ones, recursively; a link among them is
    left out (a rule holds the folder a link leads to, which may lie anywhere). A root beneath a hidden path is
    kept: it is Python's own or a package loaded (a results folder that holds the environment, say)."""
    if root in seen or any(root == h for h in hidden):
        return []
    seen.add(root)
    if not any(_beneath(h, root) and h != root for h in hidden):
        return [root]
    out = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if not entry.is_symlink():
                    out += _split(entry.path, hidden, seen)
    except OSError:  # a folder this user cannot list: nothing of it is readable
        return []
    return out


CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18


def hide(folders: list[str], keep: list[str] = ()) -> str:
    """Hide ``folders`` from this process and its children, names included: Landlock does not confine ``stat``, so a
    confined process could still test which files exist in a data root (an ImageNet folder's class of each file
    name). In a mount namespace of its own (and, not as root, a user namespace that maps this user to itself, where
    the kernel lets unprivileged users have one), an empty read-only tmpfs lies over each folder, but one that holds
    a path of ``keep`` (what :func:`readable` gives: Python, the code). Call it before capabilities are dropped and
    before :func:`confine`, in a process with one thread. Returns what was done; raises ``OSError`` where the kernel
    refuses."""
    folders = sorted({os.path.realpath(f) for f in folders if os.path.isdir(f)})
    folders = [f for f in folders if not any(_beneath(k, f) for k in keep)]
    if not folders:
        return "no folder to hide"
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)) != 0:
        raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    # nothing mounted here reaches the namespace the process came from
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}")
    for folder in folders:
        if libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      b"size=4k,mode=0") != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {folder}: {os.strerror(ctypes.get_errno())}")
    return f"{len(folders)} folder(s) hidden"


def drop_capabilities() -> bool:
    """Give up every capability of this process (a root process keeps its uid, loses what lets root pass file
    permissions, load kernel modules, signal any process, ...); True when there were some to drop."""
    if platform.machine() not in CAPABILITY_SYSCALLS:
        return False
    capget, capset = CAPABILITY_SYSCALLS[platform.machine()]
    libc = _libc()
    header = ctypes.create_string_buffer(struct.pack("=Ii", CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two struct __user_cap_data_struct: effective, permitted, inheritable
    if libc.syscall(capget, header, data) != 0:
        return False
    if not any(data.raw):
        return False
    if libc.syscall(capset, header, ctypes.create_string_buffer(24)) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    return True


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


def _filter(machine: str, bounded: bool = False, pid: int | None = None) -> list[tuple[int, int, int, int]]:
    """The BPF program: a call from another architecture's table (32-bit x86's ``socketcall``, x32's) is refused
    whatever it is; of the native table, :data:`CHANNELS`, :data:`REACH` and :data:`PIDFD`, ``prlimit64`` unless its
    pid is 0 (the calling process: what ``setrlimit`` and ``getrlimit`` ask), :data:`SIGNALS` to any process but
    ``pid`` (this one's, by default), ``fcntl``'s :data:`LOCKS` and an owner (F_SETOWN) other than ``pid``'s process
    or group, and the ioctls that set an owner; ``bounded``, also the memory and processes that ``RLIMIT_DATA`` does
    not count (:data:`UNCOUNTED`); anything else is allowed."""
    numbers = SYSCALLS[machine]
    pid = os.getpid() if pid is None else pid
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
    this user's (a Ray raylet, a Docker daemon), System V shared memory or message queues (which another half, or
    the next unit, could read), or keyrings; nor the calls of :data:`REACH`, nor ``prlimit64`` on another process
    (:func:`_filter`), nor a signal to another process (:data:`SIGNALS`; call it where this process leads its process
    group). A half needs none of them: its line to the loop is open before it is confined. ``bounded``
    (under a memory limit, with :func:`bound_memory`): nor memory that the limit does not count, nor a new process
    (threads start as before). Returns what was applied, or ``channels open (...)``."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        return f"channels open (no seccomp filter for {machine})"
    program = _filter(machine, bounded)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in program))
    prog = ctypes.create_string_buffer(struct.pack("@HP", len(program), ctypes.addressof(filters)))
    libc = _libc()
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
