"""The processes of the isolated mode (:mod:`cemabench.protocol.isolation`): a *zygote*, started fresh (not forked from
the harness), that imported torch, the zoo's libraries and cemabench's own protocol and models (no plugin:
:data:`PRELOAD`), and forks each half; and a half's main loop, which cuts it off before any method code is imported
and then answers the loop's calls (:mod:`cemabench.protocol.sides`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import importlib.machinery
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import warnings
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path

from cemabench import provenance, registry
from cemabench.config.paths import cache_root
from cemabench.errors import HalfFailed
from cemabench.protocol import hygiene, sandbox, seccomp
from cemabench.protocol.execution import warm_allocator
from cemabench.protocol.messages import pack, receive, rng_state, send, set_rng_state
from cemabench.protocol.plain import NotPlain
from cemabench.protocol.sides import LINE, SIDES, error_reply, from_loop

# -- the zygote: a clean process that forks the halves ---------------------------------------------------------------
# (Ctrl-C is the harness's to handle: the zygotes end when their lines close, and each half runs in a session of its
# own; a zygote interrupted printed a traceback of its own beside the harness's)
BOOT = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys, json; "
        "sys.path[:] = json.loads(sys.argv[1]); from cemabench.protocol.zygote import zygote; zygote(int(sys.argv[2]))")
# imported by the zygote, so that each half does not import them for itself: torch.optim's first optimizer imports
# torch._dynamo (1.4 s here); torchvision and timm hold the zoo's model classes; the planner's and the model
# builder's modules (:mod:`cemabench.models.builder`, whose side a half serves by name) and the built-in
# models' (harness code, none a plugin's); SciPy's optimisers, which ECCENTRIC's and Entropic Student's modules
# import (0.2 s in each half of each of their units: a library, not a plugin); and the built-in datasets' modules,
# which each planner imports for the code digest of its method's units (80 ms a planner, SciPy's ndimage included).
# Code only: a half reads no data (the cloud half asks the loop for the clean split's images, :class:`_AskedClean`)
PRELOAD = ("torch._dynamo", "torchvision", "timm", "scipy.optimize", "cemabench.protocol.planner",
           *(f"cemabench.models.{m}" for m in ("builder", "mini", "minidet", "zoo", "cifar")),
           *(f"cemabench.datasets.{d}" for d in ("reader", "miniature", "minidet", "imagenet", "cifar", "coco", "hf")))
SANDBOX = ""  # in a half: what confines it (cemabench.protocol.sandbox)
# the device files a half may open for writing and use ioctls on: /dev/null, and NVIDIA's GPU nodes where there are
DEVICES = tuple(sorted(str(p) for p in Path("/dev").glob("nvidia*") if not p.is_dir()))
# what the halves forked from now on may not read, should it lie where they read (an import path folder, say): the
# data roots and results folders this process uses (:func:`hide`); the cache root always
HIDDEN: set[str] = set()
# the environment variables a half gets: those that torch, CUDA, cuDNN, NCCL, Triton, OpenMP, the BLAS libraries, the C
# library's allocator, Python, the locale and cemabench read, and the paths a process runs with; none other (a list of
# names that hold credentials always misses some: a review's plugin printed DB_PW, DOCKER_CREDS, SLACK_HOOK and a
# Stripe key from the loop's environment in its table). Of these, none that holds a credential either, and no OpenMP
# binding of threads to CPUs (a half sets no other thread's CPUs: :data:`cemabench.protocol.seccomp.SCHEDULING`)
HALF_VARIABLES = re.compile(r"(?!OMP_PROC_BIND|OMP_PLACES|GOMP_CPU_AFFINITY|KMP_AFFINITY)"
                            r"(CUDA|NVIDIA|CUBLAS|CUDNN|NCCL|TORCH|PYTORCH|TRITON|ATEN|OMP_|KMP_|GOMP_|MKL|OPENBLAS"
                            r"|BLIS|ONEDNN|DNNL|MALLOC_|GLIBC_TUNABLES|PYTHON|LC_|CEMABENCH_)|(PATH|HOME|USER|LOGNAME"
                            r"|LANG|LANGUAGE|TZ|TMPDIR|LD_LIBRARY_PATH|LD_PRELOAD|VIRTUAL_ENV|CONDA_PREFIX)$")
# names that say a variable holds a credential (a token, a key, a password, a URL, which may carry a user and password).
# A half cannot send a secret anywhere (no socket, no file written, no network to use a URL on), but its error message
# is printed in the table, which users publish
CREDENTIAL = re.compile(r"TOKEN(?!IZER)|SECRET|PASS|_PWD?($|_)|CRED|PRIVATE|AUTH(?!OR)|COOKIE|APIKEY|ACCESS_?KEY|JWT"
                        r"|DSN|HOOK|NETRC|CONNECTION_?STRING|PROXY|(^|_)(API_?)?KEYS?(_|$)|(^|_)(PAT|SAS)(_|$)"
                        r"|(^|_)UR[LI](_|$)", re.IGNORECASE)
# and values that are a credential in a form its issuer gives it, whatever the variable's name (a token in MY_HUB):
# Hugging Face, GitHub, GitLab, OpenAI-style, Stripe, Slack, Telegram, AWS and Google keys, npm and PyPI tokens, JWTs,
# Azure shared access signatures, PEM private keys, and a URL that carries a user's password
CREDENTIAL_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{40,}|glpat-[\w-]{20,}"
    r"|sk-[\w-]{20,}|[rs]k_(live|test)_\w{20,}|xox[abeprs]-[\w-]{10,}|hooks\.slack\.com/\S+|\d{8,10}:AA[\w-]{30,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|AIza[\w-]{35}|ya29\.[\w-]{20,}|npm_[A-Za-z0-9]{36}|pypi-[\w-]{50,}"
    r"|eyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]*|sig=[\w%+/=-]{20,})"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
# the pid that started it -> (process, connection, lock): a worker forked from that process adopts the zygote forked
# for it (:func:`spare`) or starts its own
_ZYGOTES: dict[int, tuple] = {}
_SPARE: list[tuple] = []  # the zygote forked for the next local worker that this process forks (:func:`spare`)


def hide(path) -> None:
    """Keep ``path`` (a data root, a results folder) from every half forked from now on, wherever it lies."""
    if path is not None:
        HIDDEN.add(os.path.abspath(path))


def half_environment() -> dict[str, str]:
    """This process's environment variables that a half gets (:data:`HALF_VARIABLES`), less those that hold a
    credential (:func:`credential`)."""
    return {name: value for name, value in os.environ.items()
            if HALF_VARIABLES.match(name) and not credential(name, value)}


def credential(name: str, value: str) -> bool:
    """Whether a variable's name or value says it holds a credential (:data:`CREDENTIAL`, :data:`CREDENTIAL_VALUE`)."""
    return bool(CREDENTIAL.search(name) or CREDENTIAL_VALUE.search(value))


def withheld() -> list[str]:
    """The names of the environment variables that compute may read (:data:`HALF_VARIABLES`) but that hold a
    credential, which the halves therefore do not get. A variable outside :data:`HALF_VARIABLES` is not named: no half
    gets any, credential or not (a line naming the loop's every ``*_HOOK_PATH`` and ``*_URL`` is noise)."""
    return sorted(name for name, value in os.environ.items() if HALF_VARIABLES.match(name) and credential(name, value))


def drop_inherited() -> None:
    """In a process forked from one that started a zygote (a local worker): close this copy of that zygote's line, so
    that method code run here cannot write into it (and leave the zygote reading a message that never ends); adopt
    the zygote forked for this process (:func:`spare`), if there is one."""
    for pid in [p for p in _ZYGOTES if p != os.getpid()]:
        with contextlib.suppress(OSError):
            _ZYGOTES.pop(pid)[1].close()
    if _SPARE:
        _ZYGOTES[os.getpid()] = _SPARE.pop()


class _Forked:
    """A zygote forked from another (:func:`spare`): not a child of the process that uses it, so watched and ended
    through a pidfd, as :class:`subprocess.Popen` watches and ends a child."""

    def __init__(self, pid: int):
        self.pid, self.pidfd = pid, os.pidfd_open(pid)  # (it waits for its first request: the pid is still its own)

    def poll(self) -> int | None:
        return 0 if select.select([self.pidfd], [], [], 0)[0] else None

    def wait(self, timeout: float | None = None) -> int:
        if not select.select([self.pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired("zygote", timeout)
        return 0

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def spare(memory: int | None) -> None:
    """Before this process forks a local worker: where it has a zygote (it planned under ``--isolate``), a zygote
    forked from that one, for the worker to adopt (:func:`drop_inherited`). It has imported what a zygote imports,
    so the worker's first unit does not wait for a fresh zygote's imports (3-4 s here). It runs under the worker's
    memory limit (``--unit-memory``), as the worker's own zygote would. Where none can be had, the worker starts its
    own, as before."""
    entry = _ZYGOTES.get(os.getpid())
    if entry is None or entry[0].poll() is not None:
        return
    process, conn, lock = entry
    with lock:
        try:
            conn.send(("zygote", memory))
            if not conn.poll(HANDSHAKE_S):
                raise OSError("no answer")
            fd = reduction.recv_handle(conn)
            forked = _Forked(conn.recv())
        except (EOFError, OSError):  # this process's zygote is broken: replaced when next asked for a half
            _stop_zygote()
            return
    _SPARE[:] = [(forked, Connection(fd), threading.Lock())]


def forked() -> None:
    """In this process, after it forked a local worker: its copy of the worker's zygote (:func:`spare`) closed."""
    while _SPARE:
        process, conn, _ = _SPARE.pop()
        conn.close()
        process.close()


def _zygote_connection() -> tuple:
    entry = _ZYGOTES.get(os.getpid())
    if entry is not None and entry[0].poll() is None:
        return entry
    drop_inherited()
    if entry is not None:
        _stop_zygote()
    ours, theirs = socket.socketpair()
    # (its environment is a half's from the start: a process's first environment stays in its memory, which a half
    # forked from it can read, in /proc/self/environ say, whatever it is given later; one hash seed, so that what a
    # half pickles is the same bytes in every run: a set's order, a model builder's fingerprint)
    process = subprocess.Popen([sys.executable, "-c", BOOT, json.dumps(sys.path), str(theirs.fileno())],
                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                               env={**half_environment(), "PYTHONHASHSEED": "0"})
    theirs.close()
    entry = _ZYGOTES[os.getpid()] = (process, Connection(ours.detach()), threading.Lock())
    return entry


def _stop_zygote() -> None:
    process, conn, _ = _ZYGOTES.pop(os.getpid())
    with contextlib.suppress(OSError):
        conn.close()
    process.kill()
    process.wait()
    if isinstance(process, _Forked):
        process.close()


def zygote_data() -> int | None:
    """The data memory (bytes) that this process's zygote holds, which each half forked from it starts with."""
    entry = _ZYGOTES.get(os.getpid())
    try:
        return seccomp.memory_of(entry[0].pid)["VmData"]
    except (TypeError, OSError, KeyError):
        return None


def _limited() -> bool:
    """Whether this process runs under a data-size limit (``--unit-memory``)."""
    return resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY


HANDSHAKE_S = 120.0  # how long a zygote may take to fork a half (the first request waits for its imports)


@dataclasses.dataclass(frozen=True)
class Access:
    """What a harness process forked as a half may reach beyond a method half (a model builder, a dataset reader):
    ``reads``, folders it may read besides code and the system's files (less the hidden ones); ``writes``, folders it
    may write (a dataset reader's own cache); ``shown``, hidden folders it is shown (a dataset reader's data root);
    ``environ``, variables set for it; ``maps_shared``, it may map files shared (a reader's memory-mapped arrays, a
    builder's safetensors: a method half on the CPU may not, since a futex in a page two halves map is a channel
    between them, and no method half maps what these read)."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    shown: tuple[str, ...] = ()
    environ: tuple[tuple[str, str], ...] = ()
    maps_shared: bool = False


METHOD_HALF = Access()  # a method half's: nothing beyond code and the system's files


def fork_half(memory: int | None = None, cpu: bool = True, access: Access = METHOD_HALF) -> tuple[int, int]:
    """A new half's socket and pid, from this process's zygote; a zygote that does not answer (stuck, stopped) is
    replaced once. ``memory``: the half's data-size limit, where it is not its zygote's (a planner's); ``cpu``: the
    half computes on the CPU (:func:`cemabench.protocol.seccomp.bound_memory`); ``access``: what it may reach beyond
    a method half. Every half is kept from cemabench's cache (this process's) and the hidden folders."""
    hidden = sorted({str(cache_root()), *HIDDEN} - {os.path.abspath(p) for p in access.shown})
    why = ""
    for _ in range(2):
        process, conn, lock = _zygote_connection()
        with lock:
            try:
                conn.send((list(sys.path), {**half_environment(), **dict(access.environ)}, hidden, memory,
                           cpu and not access.maps_shared, list(access.reads), list(access.writes)))
                if conn.poll(HANDSHAKE_S):
                    return reduction.recv_handle(conn), conn.recv()
                why = f"did not answer within {HANDSHAKE_S:g} s"
            except (EOFError, OSError) as error:
                try:
                    code = process.wait(5)
                except subprocess.TimeoutExpired:
                    why = f"broke its line to this process ({error})"
                else:
                    ended = (f"killed by {signal.Signals(-code).name}" if code < 0 else "ended" if
                             isinstance(process, _Forked) else f"exit code {code}")
                    why = f"ended before it answered ({ended}; under --unit-memory it may have had too little memory)"
        _stop_zygote()
    raise HalfFailed(f"the zygote that forks the halves {why}, twice",
                     "out-of-memory" if "ended" in why and _limited() else "error")


def zygote(fd: int) -> None:
    """The zygote's main loop: for each request, fork a half and hand the harness its end of a fresh socket."""
    from cemabench.protocol import native

    for name in PRELOAD:  # what the first unit of every half would otherwise import for itself (no plugin code)
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their deprecation notices, once per zygote, say nothing about the run
            importlib.import_module(name)
    native.meter_module()
    for kind in registry.GROUPS:  # the plugins' entry points (names and modules: nothing imported), read once here
        registry.available(kind)  # rather than in every half (10 ms a half)
    provenance.warm()  # the harness's sources, parsed once for every planner's code digests
    sandbox.readable(sys.path, [])  # what the modules loaded here make readable, known once to every half
    warm_allocator()  # for every half forked from here

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the system reaps the halves
    _serve(Connection(fd))


def _serve(conn: Connection) -> None:
    """Fork a half for each request (or, asked by :func:`spare`, a zygote that serves its own line); never returns."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            conn.close()
            ours.close()
            if request[0] == "zygote":  # a zygote for a worker: ends with this one, and when the worker's line closes
                die_with_parent()
                if request[1] is not None:
                    resource.setrlimit(resource.RLIMIT_DATA, (request[1], request[1]))
                _serve(Connection(theirs.detach()))
            _half(Connection(theirs.detach()), *request)
        theirs.close()
        reduction.send_handle(conn, ours.fileno(), pid)
        conn.send(pid)
        ours.close()


def die_with_parent() -> None:
    """Linux: this process ends when the thread that forked it does (a half with its zygote, a worker with the
    harness's process)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _half(conn: Connection, path: list[str], environ: dict, hidden: list[str], memory: int | None,
          cpu: bool, reads: list[str], writes: list[str]) -> None:
    """A half's process: cut off (its own session, no terminal, its output discarded, a mount namespace where the
    hidden folders are empty, its working directory /, no capabilities, no page shared with another process, confined
    by Landlock and a seccomp filter (:mod:`cemabench.protocol.seccomp`); under a memory limit, ``memory`` or its
    zygote's, no memory that the limit does not count and no new process) before any method code is imported, set up
    from the harness's requests, then answering its steps; never returns."""
    global SANDBOX
    LINE[:] = [conn]
    if memory is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    bounded = _limited()
    if bounded:
        seccomp.bound_memory(cpu)
    seccomp.privatize_shared()  # no page shared with the other half (the C library's gconv cache, from the zygote)
    os.setsid()  # no controlling terminal (nothing to type into), and a process group of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (the zygote's is ignored)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the harness's stdout may be a results file (`cemabench run > table.md`)
        os.dup2(null, fd)
    os.close(null)
    sys.path[:] = [entry or os.getcwd() for entry in path]  # "" is the working directory, which is left below
    os.environ.clear()
    os.environ.update(environ)
    importlib.invalidate_caches()
    # each import path folder's listing read now, for its modules and its distributions' entry points (importlib's
    # caches, kept while the folder is unchanged): of a folder that is not Python's own only the code stays readable
    importlib.machinery.PathFinder.find_spec("cemabench-lists-the-import-path")
    registry.entry_points_of_all()
    readable = sandbox.readable(sys.path, hidden, [*reads, *writes])
    try:  # (as root, before the capabilities go)
        names = sandbox.hide(hidden, readable)
    except OSError as error:
        names = f"names not hidden ({error})"
    os.chdir("/")  # a working directory inside a hidden folder would still show its names (relative to it)
    with contextlib.suppress(OSError):  # a failure here must not skip the confinement below
        sandbox.drop_capabilities()
    refused = ""
    try:
        SANDBOX = f"{sandbox.confine([os.devnull, *DEVICES, *writes], readable)}; {names}"
    except OSError as error:  # the kernel has Landlock and refused these rules: no plugin code runs unconfined
        SANDBOX, refused = f"none (refused: {error})", str(error)
    try:
        SANDBOX += f"; {seccomp.forbid_channels(bounded, cpu)}"
    except OSError as error:
        SANDBOX += f"; channels open ({error})"
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    side = None
    while True:
        try:
            data = receive(conn)
            op, args, rng = from_loop(data)
        except (EOFError, OSError):
            os._exit(0)
        try:
            if op in SIDES:  # set-up: the method's module is imported here (no random state crosses back)
                if refused:
                    raise RuntimeError(f"its confinement could not be applied ({refused}); no plugin code runs "
                                       f"unconfined where the kernel confines")
                side = SIDES[op](*args)
                if side.replaced:
                    raise RuntimeError(f"cemabench's own code was replaced in this process (by a plugin, at "
                                       f"import?): {', '.join(side.replaced[:5])}")
                reply = {"sandbox": SANDBOX}
            else:
                set_rng_state(rng, side.device)
                reply = getattr(side, op)(*args)
                replaced = hygiene.replaced_harness_code()  # the meter and the guard run beside the method's code
                if replaced:
                    raise RuntimeError(f"method code replaced cemabench's own code in its half: "
                                       f"{', '.join(replaced[:5])}")
                reply["rng"] = rng_state(side.device)
        except KeyboardInterrupt:
            os._exit(1)
        except BaseException as error:  # noqa: BLE001 - method code's failure, sys.exit() included, goes to the loop
            reply = {"error": error_reply(error)}
        try:
            send(conn, reply)
        except Exception as error:  # noqa: BLE001 - what cannot be packed fails the cell, by name
            conn.send_bytes(pack({"error": error_reply(NotPlain(f"its reply could not be sent: {error}"))}))


