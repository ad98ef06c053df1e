"""What Landlock leaves an isolated half to read (cemabench/protocol/sandbox.py): the system's files, Python's, the
importable code, and nothing beneath a hidden folder even where it lies inside one of those."""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys
from pathlib import Path

import pytest

from cemabench.protocol import sandbox, seccomp


def _beneath(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def _layout(tmp_path):
    code = tmp_path / "code"  # a folder on the import path (a project's root, run with python -m)
    (code / "sandbox_probe").mkdir(parents=True)
    (code / "sandbox_probe" / "__init__.py").write_text("ANSWER = 42\n")
    (code / "sandbox_helper.py").write_text("HELP = 7\n")
    (code / "notes.txt").write_text("beside the code: not code\n")
    (code / "results").mkdir()  # a folder beside the code that is no package
    (code / "results" / "table.json").write_text("{}\n")
    (code / "sandbox_probe" / "data" / "val").mkdir(parents=True)  # a data root inside a package, hidden
    (code / "sandbox_probe" / "data" / "val" / "labels.txt").write_text("secret\n")
    (code / "sandbox_probe" / "back").symlink_to(code)  # a link back up
    (code / "sandbox_probe" / "everything").symlink_to("/")  # a link out: never a rule of its own
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("secret\n")
    (code / "zz.dist-info").symlink_to(code / "sandbox_probe" / "data")  # links named like code (a hostile review)
    (code / "zz_labels.py").symlink_to(tmp_path / "elsewhere" / "secret.txt")
    (code / "zz_pkg").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "__init__.py").write_text("")
    (code / "val_labels.zip").write_bytes(b"PK")  # an archive beside the code is code only as a path entry itself
    return code


def test_what_is_readable_holds_no_hidden_folder_nor_one_that_contains_it(tmp_path, monkeypatch):
    code = _layout(tmp_path)
    hidden = str(code / "sandbox_probe" / "data")
    monkeypatch.chdir(tmp_path / "elsewhere")  # torch.ops's __file__ is relative: not the working directory
    rules = sandbox.readable([*sys.path, str(code)], [hidden])
    assert str(code / "sandbox_helper.py") in rules and str(code / "sandbox_probe" / "__init__.py") in rules
    for path in rules:
        assert not _beneath(path, hidden) and not _beneath(hidden, path), path
        assert not _beneath(str(tmp_path / "elsewhere"), path), path
        assert path not in ("/", "/root", "/tmp", str(code), str(code / "notes.txt"), str(code / "results"),
                            str(code / "val_labels.zip")), path
    assert any(_beneath(os.path.realpath(sys.base_prefix), path) for path in rules)


def test_a_folder_that_cannot_be_listed_gives_nothing_and_fails_nothing(tmp_path):
    """An import path entry this user cannot list (or that is gone) is no code, as Python finds none in it; a half's
    set-up must not fail on it before it is confined."""
    assert sandbox._code_in(str(tmp_path / "gone")) == []
    assert sandbox._split(str(tmp_path / "gone"), [str(tmp_path / "gone" / "data")], set()) == []


def test_a_hidden_folder_that_holds_python_keeps_python_readable(tmp_path):
    """``--out`` on a folder that holds the environment (a results folder above the venv): Python stays readable."""
    prefix = os.path.realpath(sys.prefix)
    rules = sandbox.readable(sys.path, [os.path.dirname(prefix)])
    assert any(_beneath(prefix, path) for path in rules)


def _in_a_child(act) -> dict:
    """Fork, run ``act`` in the child (confinement lasts a process's life) and return the dict it made, or what it
    raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = act()
        except BaseException as error:  # noqa: BLE001 - said to the parent
            out = {"error": repr(error)}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return said


def _confined(code, hidden: str) -> dict:
    """Confine this process as a half is (its import path listed first), and say what it could do."""
    out = {}
    sys.path.insert(0, str(code))
    importlib.invalidate_caches()
    importlib.machinery.PathFinder.find_spec("cemabench-lists-the-import-path")
    out["sandbox"] = sandbox.confine([os.devnull], sandbox.readable(sys.path, [hidden]))
    out["import"] = importlib.import_module("sandbox_probe").ANSWER
    out["import a module"] = importlib.import_module("sandbox_helper").HELP
    for name, act in (("notes", lambda: (code / "notes.txt").read_text()),
                      ("results", lambda: (code / "results" / "table.json").read_text()),
                      ("labels", lambda: (code / "sandbox_probe" / "data" / "val" / "labels.txt").read_text()),
                      ("through a link", lambda: (code / "sandbox_probe" / "back" / "notes.txt").read_text()),
                      ("out through a link", lambda: os.listdir(code / "sandbox_probe" / "everything" / "tmp")),
                      ("list the root", lambda: os.listdir(code)),
                      ("list the data", lambda: os.listdir(code / "sandbox_probe" / "data")),
                      ("elsewhere", lambda: (code.parent / "elsewhere" / "secret.txt").read_text()),
                      ("a link named like metadata", lambda: os.listdir(code / "zz.dist-info")),
                      ("a link named like a module", lambda: (code / "zz_labels.py").read_text()),
                      ("a link named like a package", lambda: (code / "zz_pkg" / "secret.txt").read_text()),
                      ("an archive beside the code", lambda: (code / "val_labels.zip").read_bytes()),
                      ("its own /proc", lambda: Path("/proc/self/status").read_text()),
                      ("the kernel's /proc", lambda: Path("/proc/cpuinfo").read_text()),
                      ("another process's /proc", lambda: Path(f"/proc/{os.getppid()}/cmdline").read_bytes())):
        try:
            act()
            out[name] = "read"
        except OSError as error:
            out[name] = type(error).__name__
    return out


def test_a_confined_process_reads_the_code_and_nothing_beside_it_hidden_or_elsewhere(tmp_path):
    if sandbox.abi() < 1:
        pytest.skip("this kernel has no Landlock")
    code = _layout(tmp_path)
    said = _in_a_child(lambda: _confined(code, str(code / "sandbox_probe" / "data")))
    assert "error" not in said, said
    assert said["sandbox"].endswith("reads confined")
    assert said["import"] == 42 and said["import a module"] == 7  # the folder's listing was read before confining
    for name in ("notes", "results", "labels", "through a link", "out through a link", "list the root",
                 "list the data", "elsewhere", "a link named like metadata", "a link named like a module",
                 "a link named like a package", "an archive beside the code", "another process's /proc"):
        assert said[name] == "PermissionError", (name, said)
    assert said["its own /proc"] == said["the kernel's /proc"] == "read"


def test_a_hidden_folder_is_empty_to_the_process_that_hid_it_and_only_to_it(tmp_path):
    """Landlock does not confine ``stat``; in a mount namespace of its own a process sees a hidden folder empty
    (no name under it exists), while every other process sees it as it is."""
    secret = tmp_path / "data" / "n01440764" / "ILSVRC2012_val_00000293.JPEG"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"\xff\xd8")
    def try_hiding() -> dict:
        hid = sandbox.hide([str(tmp_path / "data"), str(tmp_path / "absent"), str(tmp_path)],
                           [str(tmp_path / "code")])  # not tmp_path, which holds code
        return {"hide": hid, "exists": os.path.exists(secret), "listed": os.listdir(tmp_path / "data"),
                "beside": os.path.isdir(tmp_path)}

    said = _in_a_child(try_hiding)
    if "error" in said:
        pytest.skip(f"this kernel gives no mount namespace here: {said['error']}")
    assert said == {"hide": "1 folder(s) hidden", "exists": False, "listed": [], "beside": True}
    assert secret.exists()  # this process, and the namespace it is in, are untouched
    with open("/proc/self/mountinfo") as mounts:
        assert str(tmp_path) not in mounts.read()


def test_a_process_that_forbade_channels_opens_none_and_keeps_what_it_had(tmp_path):
    """Landlock confines TCP and files only: a half could send UDP, connect by path to a Unix socket of this user's (a
    Ray raylet's, a Docker daemon's), or leave the batch in System V shared memory for the other half and the next
    unit (a hostile review found both); or a POSIX message queue, or locks on a file both halves read (bits the other
    half reads), or make another process the owner of a descriptor, whose I/O then signals it (SIGIO ends a process).
    After :func:`seccomp.forbid_channels` every new socket, System V object, POSIX queue, file lock, owner but itself
    and key is refused, while the line it already holds (a half's to the loop) still carries messages, and other
    processes keep theirs."""
    import ctypes
    import ctypes.util
    import fcntl
    import mmap
    import socket

    held, other = socket.socketpair()
    libc = ctypes.CDLL(None, use_errno=True)

    def refused(result: int) -> str:
        return "made" if result >= 0 else os.strerror(ctypes.get_errno())

    def try_channels() -> dict:
        out = {"filter": seccomp.forbid_channels(cpu=True)}
        for family, kind in (("unix", socket.AF_UNIX), ("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6),
                             ("netlink", socket.AF_NETLINK)):
            try:
                socket.socket(kind, socket.SOCK_DGRAM if kind != socket.AF_NETLINK else socket.SOCK_RAW).close()
                out[family] = "opened"
            except OSError as error:
                out[family] = error.strerror
        out["shared memory"] = refused(libc.shmget(0x68723137, 4096, 0o1000 | 0o600))  # IPC_CREAT
        out["message queue"] = refused(libc.msgget(0x68723137, 0o1000 | 0o600))
        out["semaphores"] = refused(libc.semget(0x68723137, 1, 0o1000 | 0o600))
        out["key"] = refused(libc.syscall(seccomp.SYSCALLS[platform.machine()]["add_key"], b"user", b"cemabench",
                                          b"secret", 6, -4))  # KEY_SPEC_USER_KEYRING
        try:
            socket.socketpair()
            out["pair"] = "made"
        except OSError as error:
            out["pair"] = error.strerror
        out["inotify"] = refused(libc.inotify_init1(0))
        out["namespace"] = refused(libc.unshare(0x10000000))  # CLONE_NEWUSER: capabilities of its own, to show
        out["capabilities"] = refused(libc.syscall(seccomp.SYSCALLS[platform.machine()]["capset"], None, None))
        out["aio"] = refused(libc.syscall(seccomp.SYSCALLS[platform.machine()]["io_setup"], 1,
                                          ctypes.byref(ctypes.c_ulong(0))))
        with open(sandbox.__file__, "rb") as readable:  # a futex in a page both map is one futex to both
            for what, flags in (("shared mapping", mmap.MAP_SHARED), ("private mapping", mmap.MAP_PRIVATE)):
                try:
                    mmap.mmap(readable.fileno(), 4096, flags, mmap.PROT_READ).close()
                    out[what] = "made"
                except OSError as error:
                    out[what] = error.strerror
        out["fanotify"] = refused(libc.fanotify_init(0x200, 0))  # FAN_REPORT_FID, as a review's plugin asked
        try:  # the line it holds cannot be bound to a name the other half lists in /proc/self/net/unix
            held.bind(b"\0cemabench-probe")
            out["bind"] = "made"
        except OSError as error:
            out["bind"] = error.strerror
        rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
        queue = rt.mq_open(b"/cemabench-probe", os.O_CREAT | os.O_RDWR, 0o600, None)
        out["posix queue"] = refused(queue)
        if queue >= 0:
            rt.mq_unlink(b"/cemabench-probe")
        with open(sandbox.__file__, "rb") as readable:  # a file both halves may read
            for what, call in (("flock", lambda: fcntl.flock(readable, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                               ("record lock", lambda: fcntl.lockf(readable, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 7)),
                               ("lock read", lambda: fcntl.fcntl(readable, fcntl.F_GETLK, bytes(32))),
                               ("lease", lambda: fcntl.fcntl(readable, fcntl.F_SETLEASE, fcntl.F_RDLCK)),
                               ("notify", lambda: fcntl.fcntl(os.open("/", os.O_RDONLY), fcntl.F_NOTIFY,
                                                              fcntl.DN_ACCESS)),
                               ("owner", lambda: fcntl.fcntl(readable, fcntl.F_SETOWN, os.getppid())),
                               ("own owner", lambda: fcntl.fcntl(readable, fcntl.F_SETOWN, os.getpid()))):
                try:
                    call()
                    out[what] = "made"
                except OSError as error:
                    out[what] = error.strerror
        held.sendall(b"still here")
        return out

    import platform

    if platform.machine() not in seccomp.SYSCALLS:
        pytest.skip(f"no seccomp filter for {platform.machine()}")
    said = _in_a_child(try_channels)
    if said.get("filter", "").startswith("channels open"):
        pytest.skip(f"this kernel gives no seccomp filter here: {said['filter']}")
    denied = "Operation not permitted"
    assert said == {"filter": "no socket, System V or POSIX IPC, file lock, keyring, namespace, signal or reach into "
                              "another process; no shared mapping", "unix": denied,
                    "ipv4": denied, "ipv6": denied,
                    "netlink": denied, "shared memory": denied, "message queue": denied, "semaphores": denied,
                    "key": denied, "posix queue": denied, "flock": denied, "record lock": denied, "lock read": denied,
                    "lease": denied, "notify": denied, "owner": denied, "own owner": "made", "pair": denied,
                    "inotify": denied, "fanotify": denied, "bind": denied, "namespace": denied,
                    "capabilities": denied, "aio": denied, "shared mapping": denied, "private mapping": "made"}
    assert other.recv(64) == b"still here"
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()  # this process is untouched


def test_a_process_that_forbade_channels_sets_its_own_limits_and_no_other_processes():
    """A hostile review: a half lowered the loop's file size limit (``prlimit``, which the same user may do to any
    of its processes), which ended the run, and its zygote's memory limit, which failed every later unit of every
    method. After :func:`seccomp.forbid_channels` a process sets and reads its own limits and no other process's,
    reads and writes no other process's memory, nor traces it, and signals itself (its threads, its process group)
    and no other process, by pid or through a pidfd, whatever Landlock's version (ABI 6 scopes signals)."""
    import ctypes
    import platform
    import resource
    import signal
    import threading

    if platform.machine() not in seccomp.SYSCALLS:
        pytest.skip(f"no seccomp filter for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    before = resource.getrlimit(resource.RLIMIT_FSIZE)

    def reach() -> dict:
        os.setsid()  # as a half: its process group its own
        out = {"filter": seccomp.forbid_channels()}
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # its own: setrlimit is prlimit64(0, ...)
        out["own"] = resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) and resource.prlimit(0, resource.RLIMIT_CORE)
        for what, call in (("parent's limit", lambda: resource.prlimit(parent, resource.RLIMIT_FSIZE, (0, 0))),
                           ("parent's limit read", lambda: resource.prlimit(parent, resource.RLIMIT_FSIZE))):
            try:
                call()
                out[what] = "done"
            except OSError as error:
                out[what] = error.strerror
        local, remote = (ctypes.c_char * 8)(), (ctypes.c_char * 8)()
        iov = ctypes.c_void_p * 2
        out["parent's memory"] = "read" if libc.syscall(seccomp.SYSCALLS[platform.machine()]["process_vm_readv"],
                                                       parent, iov(ctypes.addressof(local), 8), 1,
                                                       iov(ctypes.addressof(remote), 8), 1, 0) >= 0 else \
            os.strerror(ctypes.get_errno())
        seize = 0x4206  # PTRACE_SEIZE: the parent is not stopped, were it allowed
        out["trace"] = "attached" if libc.ptrace(seize, parent, None, None) >= 0 else os.strerror(ctypes.get_errno())
        own = []  # signals to itself, its threads and its process group still arrive
        signal.signal(signal.SIGUSR1, lambda *_: own.append(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        os.killpg(0, signal.SIGUSR1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        out["own signals"] = len(own)
        os.setpriority(os.PRIO_PROCESS, 0, 1)  # its own scheduling, as before
        out["own scheduling"] = [os.getpriority(os.PRIO_PROCESS, os.getpid()), len(os.sched_getaffinity(0)) > 0,
                                 os.sched_getscheduler(0) == os.SCHED_OTHER]
        ioprio = seccomp.SYSCALLS[platform.machine()]["ioprio_get"]
        out["own io priority"] = libc.syscall(ioprio, 1, 0) >= 0  # IOPRIO_WHO_PROCESS, itself
        out["parent's io priority"] = "read" if libc.syscall(ioprio, 1, parent) >= 0 else os.strerror(
            ctypes.get_errno())
        for what, call in (("parent's nice", lambda: os.setpriority(os.PRIO_PROCESS, parent, 19)),
                           ("parent's nice read", lambda: os.getpriority(os.PRIO_PROCESS, parent)),
                           ("user's nice", lambda: os.getpriority(os.PRIO_USER, os.getuid())),
                           ("parent's policy", lambda: os.sched_setscheduler(parent, os.SCHED_IDLE,
                                                                             os.sched_param(0))),
                           ("parent's CPUs read", lambda: os.sched_getaffinity(parent)),
                           ("parent's CPUs", lambda: os.sched_setaffinity(parent, {0})),
                           ("parent's time slice", lambda: os.sched_rr_get_interval(parent))):
            try:
                call()
                out[what] = "done"
            except OSError as error:
                out[what] = error.strerror
        for what, call in (("parent's signal", lambda: os.kill(parent, 0)),  # asks only whether it exists
                           ("parent's queue", lambda: signal.pidfd_send_signal(os.pidfd_open(parent), 0))):
            try:
                call()
                out[what] = "sent"
            except OSError as error:
                out[what] = error.strerror
        return out

    said = _in_a_child(reach)
    if said.get("filter", "").startswith("channels open"):
        pytest.skip(f"this kernel gives no seccomp filter here: {said['filter']}")
    denied = "Operation not permitted"
    assert said["own"] == [0, 0], said
    assert {k: said[k] for k in ("parent's limit", "parent's limit read", "parent's memory", "trace", "parent's signal",
                                 "parent's queue", "own signals")} == {
        "parent's limit": denied, "parent's limit read": denied, "parent's memory": denied, "trace": denied,
        "parent's signal": denied, "parent's queue": denied, "own signals": 4}
    assert said["own scheduling"] == [1, True, True] and said["own io priority"] is True
    assert {k: said[k] for k in ("parent's io priority", "parent's nice", "parent's nice read", "user's nice",
                                 "parent's policy", "parent's CPUs read", "parent's CPUs", "parent's time slice")} == {
        "parent's io priority": denied, "parent's nice": denied, "parent's nice read": denied, "user's nice": denied,
        "parent's policy": denied, "parent's CPUs read": denied, "parent's CPUs": denied,
        "parent's time slice": denied}
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0
    assert resource.getrlimit(resource.RLIMIT_FSIZE) == before


BOUNDED = """
import json, resource, sys, threading
import torch
from cemabench.protocol import seccomp
from hostile import _uncounted
bound = sys.argv[1] == "bound"
with open("/proc/self/status") as status:
    held = next(int(line.split()[1]) for line in status if line.startswith("VmData:")) << 10
resource.setrlimit(resource.RLIMIT_DATA, (held + (160 << 20), held + (160 << 20)))  # 160 MiB more than it holds
seccomp.RESERVED = 128 << 20  # (address space for reservations: less than a real run gets, so that the test is small)
if bound:
    seccomp.bound_memory()
out = {"filter": seccomp.forbid_channels(bound)}
done = []
thread = threading.Thread(target=done.append, args=[1])
thread.start()
thread.join()
grown = bytearray(1 << 20)
for _ in range(6):
    grown.extend(bytes(len(grown)))
torch.set_num_threads(2)
x = torch.rand(512, 512, dtype=torch.float64)
out["works"] = [done == [1], len(grown) == 64 << 20, torch.equal(x @ x, torch.mm(x, x))]
del grown, x
for name, take in _uncounted(96 << 20).items():
    try:
        take()
        out[name] = "taken"
    except OSError as error:
        out[name] = error.strerror
try:
    resource.setrlimit(resource.RLIMIT_STACK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["stack limit"] = "raised"
except ValueError:
    out["stack limit"] = "kept"
try:
    bytearray(1 << 30)
    out["past the limit"] = "taken"
except MemoryError:
    out["past the limit"] = "refused"
print(json.dumps(out))
"""


def test_a_bounded_process_takes_memory_its_limit_counts_and_starts_threads_but_no_process(plugins):
    """Under a data-size limit (``RLIMIT_DATA``, --unit-memory) shared anonymous memory, a memfd, a mapping that grows
    down, a stack grown by ``mremap`` and a forked process (a limit of its own) are not counted: a hostile review held
    3 GiB under 2G. After :func:`seccomp.bound_memory` and a bounded filter each is refused, and the stack's limit
    stays where it is; private memory up to the limit, threads (the C library starts them with ``clone`` once
    ``clone3`` says ENOSYS), a buffer grown past a mapping (``realloc`` without ``mremap``) and torch's compute on two
    threads work as before. The same calls without the bound get every one of them. (In a fresh process: a forked
    one would hang in torch's thread pool, which fork leaves broken.)"""
    import platform
    import subprocess

    if platform.machine() not in seccomp.SYSCALLS:
        pytest.skip(f"no seccomp filter for {platform.machine()}")

    def said(bound: str) -> dict:
        done = subprocess.run([sys.executable, "-c", BOUNDED, bound], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    bounded = said("bound")
    if bounded["filter"].startswith("channels open"):
        pytest.skip(f"this kernel gives no seccomp filter here: {bounded['filter']}")
    denied, full = "Operation not permitted", "Cannot allocate memory"
    assert bounded == {"filter": "no socket, System V or POSIX IPC, file lock, keyring, namespace, signal or reach "
                                 "into another process; memory bounded (no "
                                 "shared, memfd or growing mapping, no new process)",
                       "shared memory": denied, "a memfd": denied, "a mapping that grows down": denied,
                       "the stack grown": denied, "a new process": denied, "memory made read-only": full,
                       "a mapping read only": full, "pages given to a pipe": denied,
                       "stack limit": "kept", "past the limit": "refused", "works": [True, True, True]}
    unbounded = said("unbounded")
    assert {k: v for k, v in unbounded.items() if k != "filter"} == {
        "shared memory": "taken", "a memfd": "taken", "a mapping that grows down": "taken", "the stack grown": "taken",
        "a new process": "taken", "memory made read-only": "taken", "a mapping read only": "taken",
        "pages given to a pipe": "taken", "stack limit": "raised", "past the limit": "refused",
        "works": [True, True, True]}


def test_a_process_maps_no_page_shared_with_another_after_privatize_shared():
    """A half inherits its zygote's read-only shared mappings (the C library's gconv cache), and so does the other
    half: a futex in a shared page is one futex to both, a channel no call the filter refuses. Each is replaced by a
    private copy of the same bytes, at the same address (a file's, or one deleted, such as shared memory)."""
    import mmap

    def privatized() -> dict:
        with open(sandbox.__file__, "rb") as readable:
            shared = mmap.mmap(readable.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        anonymous = mmap.mmap(-1, 4096)  # shared memory, as a deleted file's
        anonymous[:5] = b"bytes"
        before = shared[:64]
        done = seccomp.privatize_shared()
        with open("/proc/self/maps") as maps:
            left = [line.split()[-1] for line in maps if line.split()[1][3] == "s"]
        return {"privatized": sandbox.__file__ in done, "left": left,
                "same bytes": [shared[:64] == before, anonymous[:5] == b"bytes"]}

    assert _in_a_child(privatized) == {"privatized": True, "left": [], "same bytes": [True, True]}
