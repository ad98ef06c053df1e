"""A half's seccomp filter (``--isolate``): the system calls that Landlock (:mod:`cemabench.protocol.sandbox`) does not
confine and a half never needs, refused by the kernel for the half and everything it starts. The filter is a BPF
program over (number, architecture, arguments), assembled here from labelled instructions (:func:`_assemble`).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import resource
import struct

from cemabench.protocol.sandbox import PR_SET_NO_NEW_PRIVS, c_library

# The system calls the filter names, and their numbers: x86-64's, aarch64's ("-": none of that name there)
_TABLE = """
socket 41 198        socketpair 53 199   bind 49 200          listen 50 201        accept 43 202
connect 42 203       accept4 288 242     io_uring_setup 425 425
shmget 29 194        shmat 30 196        shmctl 31 195        shmdt 67 197         semget 64 190
semop 65 193         semctl 66 191       semtimedop 220 192   msgget 68 186        msgsnd 69 189
msgrcv 70 188        msgctl 71 187       mq_open 240 180      mq_unlink 241 181    mq_timedsend 242 182
mq_timedreceive 243 183                  mq_notify 244 184    mq_getsetattr 245 185
flock 73 32          inotify_init 253 -  inotify_init1 294 26 inotify_add_watch 254 27
fanotify_init 300 262                    fanotify_mark 301 263
add_key 248 217      request_key 249 218 keyctl 250 219
ptrace 101 117       process_vm_readv 310 270                 process_vm_writev 311 271
prlimit64 302 261    seccomp 317 277     fcntl 72 25          ioctl 16 29
kill 62 129          tkill 200 130       tgkill 234 131       rt_sigqueueinfo 129 138
rt_tgsigqueueinfo 297 240                pidfd_open 434 434   pidfd_send_signal 424 424
sched_setparam 142 118                   sched_getparam 143 121                    sched_setscheduler 144 119
sched_getscheduler 145 120               sched_setattr 314 274                     sched_getattr 315 275
sched_getaffinity 204 123                setpriority 141 140  getpriority 140 141
ioprio_set 251 30    ioprio_get 252 31
memfd_create 319 279 memfd_secret 447 447 mremap 25 216       bpf 321 280          vmsplice 278 75
mmap 9 222           clone 56 220        clone3 435 435       fork 57 -            vfork 58 -
unshare 272 97       setns 308 268       capset 126 91        io_setup 206 0       futex_waitv 449 449
futex_wake 454 454   futex_wait 455 455  futex_requeue 456 456                     sched_setaffinity 203 122
sched_rr_get_interval 148 127
"""
_WORDS = _TABLE.split()
SYSCALLS = {machine: {name: int(numbers[column]) for name, *numbers in zip(_WORDS[::3], _WORDS[1::3], _WORDS[2::3])
                      if numbers[column] != "-"}
            for column, machine in enumerate(("x86_64", "aarch64"))}
# The calls a half never needs that open a channel Landlock does not confine (a hostile review used each it does not
# name in parentheses): a socket of any family, or a pair of them (bound to abstract names, which the other half listed
# in /proc/self/net/unix: a batch in a step; or sending to a path), and binding, connecting, listening or accepting on
# one it holds; io_uring (which opens sockets of its own); System V shared memory, semaphores and message queues, and
# POSIX message queues (the host's, shared by every process of this user whatever the mount namespace: a batch from
# one half to the other); file locks and leases (a lock on a file both halves may read, or on a range of it, is a bit
# the other half reads, in /proc/locks or by testing it: ``flock`` and ``fcntl``'s :data:`LOCKS`); notifications
# of another process's reads (inotify, fanotify, ``fcntl``'s F_NOTIFY: the edge read files named after a batch's
# bytes, the cloud got their names, and answered back the same way: cloud-only's accuracy at 0 bytes); a namespace
# of its own (in a user namespace a half holds capabilities, whose values the other half read with capget; a network
# namespace holds 200 KiB of the kernel's memory: 2.4 GiB under --unit-memory 1G) and capabilities set; Linux AIO
# contexts (a counter every process reads) and the futex2 calls, whose flags the filter cannot read (a wait on a
# futex in a file both halves map is woken by the other half: :data:`MAP_SHARED`); and the kernel's keyrings
CHANNELS = ("socket", "socketpair", "bind", "listen", "accept", "connect", "accept4", "io_uring_setup", "shmget",
            "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv",
            "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr", "flock",
            "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark", "unshare", "setns",
            "capset", "io_setup", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue", "add_key",
            "request_key", "keyctl")
F_GETLK, F_SETLK, F_SETLKW, F_SETOWN, F_SETOWN_EX, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 5, 6, 7, 8, 15, 36, 37, 38
F_SETLEASE, F_GETLEASE, F_NOTIFY = 1024, 1025, 1026
LOCKS = (F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_GETLEASE, F_NOTIFY)
# a descriptor's owner, whom its I/O signals (SIGIO, whose default ends a process): set with fcntl F_SETOWN to the
# half's own process only, never with F_SETOWN_EX (a pointer the filter cannot read) or ioctl FIOSETOWN/SIOCSPGRP
OWNER_IOCTLS = (0x8901, 0x8902)
# those that reach into another process of this user's: tracing it, reading or writing its memory; ``prlimit64`` on any
# process but itself (a half lowered the loop's file size limit, which ended the run, and its zygote's memory limit,
# which failed every later unit of every method)
REACH = ("ptrace", "process_vm_readv", "process_vm_writev")
# signals: to its own process only (its threads included), whatever Landlock's version (ABI 6 scopes signals:
# Linux 6.12; before it a half could stop the zygote or the loop with SIGSTOP): the first argument of each call below
# names the process (a thread group), which must be the half's own (kill also takes 0 and minus its pid: its process
# group, which holds only it and its children where it leads the group, as a half does after setsid); ``tkill`` names a
# thread, which must be its main one; a pidfd (which may stand for any process) is neither opened nor signalled through
SIGNALS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
PIDFD = ("pidfd_open", "pidfd_send_signal")
# scheduling, of its own process only (0 or its pid): a half set the zygote to nice 19, SCHED_IDLE and the idle I/O
# class, which every later half inherited; two halves read each other's nice values, I/O priorities, CPUs and time
# slices, and one set the CPUs of the other's threads, which that one read as its own (bits a step). The C library sets
# a thread's CPUs by its thread id where OpenMP binds its threads, so the halves get no OpenMP binding
# (:data:`cemabench.protocol.zygote.HALF_VARIABLES`)
SCHEDULING = ("sched_setparam", "sched_getparam", "sched_setscheduler", "sched_getscheduler", "sched_setattr",
              "sched_getattr", "sched_setaffinity", "sched_getaffinity", "sched_rr_get_interval")
PRIORITY, IO_PRIORITY = ("setpriority", "getpriority"), ("ioprio_set", "ioprio_get")  # (which, who): the process's own
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
# under a memory limit (:func:`bound_memory`), the ways to memory that ``RLIMIT_DATA`` does not count (a hostile
# review held 3 GiB under --unit-memory 2G): a memfd's pages, a secret memfd's, a mapping moved or grown by ``mremap``
# (the stack's, grown to a GiB), BPF maps, pages given to a pipe by ``vmsplice`` (each a whole 2 MiB huge page, kept
# after the mapping is gone: 7 GiB under 1G); ``mmap`` of shared anonymous memory or of a mapping that grows down (a
# stack's kind); and a new process, which would get a limit of its own (``clone`` without CLONE_THREAD, ``fork``,
# ``vfork``; ``clone3`` says ENOSYS, on which the C library starts threads with ``clone``)
UNCOUNTED = ("memfd_create", "memfd_secret", "mremap", "bpf", "vmsplice", "fork", "vfork")
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_BIT = 0x40000000  # x86-64's x32 system calls: another table of numbers, never Python's
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1, 1, 4
# BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE|K, BPF_ALU|AND|K, RET|K
LOAD_WORD, JUMP_EQUAL, JUMP_AT_LEAST, AND, RETURN = 0x20, 0x15, 0x35, 0x54, 0x06
ALLOW, REFUSE, NO_SUCH_CALL = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # RET_ALLOW; RET_ERRNO: EPERM, ENOSYS
FIRST_ARGUMENT = 16  # offset of args[0] in struct seccomp_data (its low word, on these little-endian machines)
MAP_SHARED_ANONYMOUS, MAP_GROWSDOWN, CLONE_THREAD = 0x21, 0x100, 0x10000
# in a half on the CPU, no shared mapping of any kind (MAP_SHARED and MAP_SHARED_VALIDATE have this bit; MAP_PRIVATE
# does not): a futex in a page of a file that two processes map shared is one futex to both, which a review's edge
# half woke for the cloud half's 64 waiting threads, a bit each. CUDA maps its device files shared, so a GPU half may
# map shared (README: what a half can still do)
MAP_SHARED = 0x1
CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET


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


def _filter(machine: str, bounded: bool = False, cpu: bool = False) -> list[tuple[int, int, int, int]]:
    """The BPF program: a call from another architecture's table (32-bit x86's ``socketcall``, x32's) is refused
    whatever it is; of the native table, :data:`CHANNELS`, :data:`REACH` and :data:`PIDFD`, ``prlimit64`` unless its
    pid is 0 (the calling process: what ``setrlimit`` and ``getrlimit`` ask), :data:`SIGNALS` and the scheduling calls
    (:data:`SCHEDULING`, :data:`PRIORITY`, :data:`IO_PRIORITY`) on any process but this one, ``fcntl``'s
    :data:`LOCKS` and an owner (F_SETOWN) other than this process or its group, and the ioctls that set an owner;
    ``clone`` into a new namespace (:data:`CLONE_NAMESPACES`; ``clone3``, whose flags it cannot read, says ENOSYS, on
    which the C library uses ``clone``); ``bounded``, also the memory and processes that ``RLIMIT_DATA`` does not count
    (:data:`UNCOUNTED`); ``cpu``, a shared mapping (:data:`MAP_SHARED`); anything else is allowed."""
    numbers, pid = SYSCALLS[machine], os.getpid()
    refused = [n for n in (*CHANNELS, *REACH, *PIDFD, *(UNCOUNTED if bounded else ())) if n in numbers]

    def argument(n: int) -> tuple:
        return LOAD_WORD, FIRST_ARGUMENT + 8 * n

    def to(label: str, *names: str) -> list:
        return [(JUMP_EQUAL, numbers[name], label, None) for name in names]

    program = [(LOAD_WORD, 4), (JUMP_EQUAL, AUDIT_ARCH[machine], None, "refuse"), (LOAD_WORD, 0),  # .arch, .nr
               *([(JUMP_AT_LEAST, X32_BIT, "refuse", None)] if machine == "x86_64" else []),
               *to("refuse", *refused), *to("prlimit", "prlimit64"), *to("kill", "kill"),
               *to("own process", *(n for n in SIGNALS if n != "kill"), *SCHEDULING),
               *to("priority", *PRIORITY), *to("io priority", *IO_PRIORITY), *to("fcntl", "fcntl"),
               *to("ioctl", "ioctl")]
    program += [*to("no such call", "clone3"), *to("clone", "clone"), *(to("mmap", "mmap") if bounded or cpu else [])]
    program += [(RETURN, ALLOW),
                "prlimit", argument(0), (JUMP_EQUAL, 0, "allow", "refuse"),
                "fcntl", argument(1), *((JUMP_EQUAL, command, "refuse", None) for command in (*LOCKS, F_SETOWN_EX)),
                (JUMP_EQUAL, F_SETOWN, None, "allow"), argument(2), (JUMP_EQUAL, 0, "group", "group"),  # (always)
                "ioctl", argument(1), *((JUMP_EQUAL, command, "refuse", None) for command in OWNER_IOCTLS),
                (RETURN, ALLOW),
                "kill", argument(0), "group", (JUMP_EQUAL, -pid & 0xFFFFFFFF, "allow", None),
                (JUMP_EQUAL, 0, "allow", None), (JUMP_EQUAL, pid, "allow", "refuse"),
                "priority", argument(0), (JUMP_EQUAL, PRIO_PROCESS, "who", "refuse"),
                "io priority", argument(0), (JUMP_EQUAL, IOPRIO_WHO_PROCESS, None, "refuse"),
                "who", argument(1), (JUMP_EQUAL, 0, "allow", None), (JUMP_EQUAL, pid, "allow", "refuse"),
                "own process", argument(0), (JUMP_EQUAL, 0, "allow", None), (JUMP_EQUAL, pid, "allow", "refuse"),
                "clone", argument(0), (AND, CLONE_NAMESPACES), (JUMP_EQUAL, 0, None, "refuse"),
                *([argument(0), (AND, CLONE_THREAD), (JUMP_EQUAL, 0, "refuse", None)] if bounded else []),
                (RETURN, ALLOW)]
    if bounded or cpu:
        program += ["mmap", *([argument(3), (AND, MAP_SHARED), (JUMP_EQUAL, 0, None, "refuse")] if cpu else []),
                    *([argument(3), (AND, MAP_GROWSDOWN), (JUMP_EQUAL, 0, None, "refuse"), argument(3),
                       (AND, MAP_SHARED_ANONYMOUS), (JUMP_EQUAL, MAP_SHARED_ANONYMOUS, "refuse", None)]
                      if bounded else []),
                    (RETURN, ALLOW)]
    program += ["no such call", (RETURN, NO_SUCH_CALL)]
    return _assemble([*program, "allow", (RETURN, ALLOW), "refuse", (RETURN, REFUSE)])


def forbid_channels(bounded: bool = False, cpu: bool = False) -> str:
    """Refuse this process (all its threads) and its children the system calls of :data:`CHANNELS` (they fail with
    EPERM): Landlock confines TCP and files, not UDP, netlink, a Unix socket that connects by path to a service of
    this user's (a Ray raylet, a Docker daemon), System V IPC, POSIX message queues or file locks (which another half,
    or the next unit, could read), or keyrings; nor the calls of :data:`REACH`, nor ``prlimit64`` on another process
    (:func:`_filter`), nor a signal to another process, directly or as a descriptor's owner (:data:`SIGNALS`; call it
    where this process leads its process group). A half needs none of them: its line to the loop is open before it is
    confined. ``bounded`` (under a memory limit, with :func:`bound_memory`): nor memory that the limit does not count,
    nor a new process (threads start as before); ``cpu`` (a process that will not use a GPU): nor a shared mapping.
    Returns what was applied, or ``channels open (...)``."""
    machine = platform.machine()
    if machine not in SYSCALLS:
        return f"channels open (no seccomp filter for {machine})"
    program = _filter(machine, bounded, cpu)
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
    return ("no socket, System V or POSIX IPC, file lock, keyring, namespace, signal or reach into another process"
            + ("; no shared mapping" if cpu else "")
            + ("; memory bounded (no shared, memfd or growing mapping, no new process)" if bounded else ""))


def bound_memory(cpu: bool = True) -> None:
    """Under a data-size limit (``RLIMIT_DATA``), before :func:`forbid_channels` with ``bounded``: the stack's and
    the open files' limits fixed where they are (their hard limits lowered to their soft ones, which a process may
    raise up to the hard): the main stack grows under ``RLIMIT_STACK``, not the data limit, and every descriptor
    holds memory of the kernel's (a pipe's buffer). An unlimited stack is given 64 MiB.

    ``cpu`` (a process that will not use a GPU): its address space bounded too (``RLIMIT_AS``), to what it maps now
    beside its data, plus what the data limit leaves and :data:`RESERVED`. The data limit counts writable private
    mappings only: a review's plugin wrote 1.5 GiB under 512 MiB by making each filled mapping read-only
    (``mprotect``), and held 6 GiB of page tables under 1 GiB through a terabyte mapped read-only. CUDA reserves far
    more address space than it uses, so a GPU half is left to the data limit."""
    for limit, otherwise in ((resource.RLIMIT_STACK, 64 << 20), (resource.RLIMIT_NOFILE, 1 << 16)):
        soft, _ = resource.getrlimit(limit)
        soft = otherwise if soft == resource.RLIM_INFINITY else soft
        resource.setrlimit(limit, (soft, soft))
    data, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if cpu and data != resource.RLIM_INFINITY:
        now = memory_of()
        space = now["VmSize"] - now["VmData"] + max(data, now["VmData"]) + RESERVED
        resource.setrlimit(resource.RLIMIT_AS, (space, space))


def memory_of(pid: int | str = "self") -> dict[str, int]:
    """A process's address space and data (``VmSize``, ``VmData``), in bytes, as /proc says."""
    with open(f"/proc/{pid}/status") as status:
        return {k: int(v.split()[0]) << 10 for k, v in (line.split(":", 1) for line in status)
                if k in ("VmSize", "VmData")}


RESERVED = 512 << 20  # address space a process reserves without using it (the C library's arenas, threads' guards)


def privatize_shared() -> list[str]:
    """Replace each shared mapping this process holds by a private copy of its bytes, at the same address and with
    the same protection; returns what they mapped. A half inherits such mappings from its zygote (the C library's
    gconv cache), and so does the other half: a futex in a shared page is one futex to every process that maps it, a
    channel that needs no call the filter refuses."""
    libc = c_library()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        entries = [line.split(maxsplit=5) for line in maps]
    done = []
    for address, perms, *rest in entries:
        if perms[3] != "s":
            continue
        start, end = (int(x, 16) for x in address.split("-"))
        data = ctypes.string_at(start, end - start) if perms[0] == "r" else b""
        got = libc.mmap(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        if got != start:
            raise OSError(ctypes.get_errno(), f"mapping {address} privately: {os.strerror(ctypes.get_errno())}")
        ctypes.memmove(start, data, len(data))
        prot = sum(flag for flag, letter in ((mmap.PROT_READ, "r"), (mmap.PROT_WRITE, "w"), (mmap.PROT_EXEC, "x"))
                   if letter in perms)
        if libc.mprotect(start, end - start, prot) != 0:
            raise OSError(ctypes.get_errno(), f"protecting {address}: {os.strerror(ctypes.get_errno())}")
        done.append(rest[-1].strip() if len(rest) == 4 else address)
    return done


MAP_FIXED = 0x10
