"""A half's process (``--isolate``) confined with Linux Landlock and seccomp: what it may read and change on disk,
whom it may reach.

A process of the same OS user can read and write every file the harness can: the datasets and their labels, the results
store, the training-artefact cache, the dataset caches. Landlock (Linux 5.13 and later, unprivileged) lets a process
give up rights for itself and everything it starts: :func:`confine` forbids creating, writing, truncating, renaming,
linking or removing any file but those it is given, reading any file or listing any folder but those beneath the folders
it is given (:func:`readable`: the system's, Python's and the importable code's), TCP, and signals and abstract sockets
beyond the process's own children; and a seccomp filter (:mod:`cemabench.protocol.seccomp`) refuses what Landlock does
not: every new socket (UDP, a Unix socket connected by path), System V and POSIX IPC, file locks, signals to another
process, the keyrings and, under a memory limit, memory the limit does not count. The rules are the kernel's; no code
in the process can lift them afterwards.

The syscalls are called through ctypes (numbers 444-446 on every architecture Linux gives them); the ruleset's fields
are those of ``linux/landlock.h``.
"""
from __future__ import annotations

import ctypes
import os
import platform
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


def c_library():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi() -> int:
    """The Landlock ABI version this kernel offers, 0 when it offers none (or this is not Linux)."""
    try:
        version = c_library().syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
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
    libc = c_library()
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


def readable(path: list[str], hidden: list[str], also: list[str] = ()) -> list[str]:
    """What a half may read, as real paths: the system's files (:data:`SYSTEM`, and of ``/proc`` the kernel's and this
    process's: :func:`_proc`) and Python's own folders whole (its
    library, the environment's site-packages); of the other import path entries (a project's source folder, a
    script's folder, the working directory under ``python -m``) only the code: modules, packages and distribution
    metadata (:func:`_code_in`), not the data or results beside it; the folders of the packages loaded (an editable
    install's, say), the files of the modules loaded on their own, and the folders a meta path finder maps. Less
    everything beneath ``hidden`` (a data root, the results folder, the caches, should one lie in such a folder): a
    folder that holds one is replaced by its entries, recursively, links left out, so that it can no longer be listed
    either. ``also``: folders readable whole besides (a model builder's weights and caches), less the hidden too."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    whole, code = {*SYSTEM, *_proc(), *prefixes, *also}, set()
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
    libc = c_library()
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
    libc = c_library()
    header = ctypes.create_string_buffer(struct.pack("=Ii", CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(24)  # two struct __user_cap_data_struct: effective, permitted, inheritable
    if libc.syscall(capget, header, data) != 0:
        return False
    if not any(data.raw):
        return False
    if libc.syscall(capset, header, ctypes.create_string_buffer(24)) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    return True
