"""Each run unit starts clean and leaves clean: the process-wide torch state that method code can change, and that
would change other cells' numbers, is the same after a unit as before it.

Method code runs in the harness's process, so a plugin could leave a global forward hook, grad mode off, another
default dtype or a dispatch mode on the stack, and every later unit in that worker process (another method's cells)
would compute under it. :func:`snapshot` reads that state (:data:`CHECKED` names it); :func:`restore` puts back what a
unit changed and says what it was, and the unit that changed it ends in an error naming it (the next unit then starts
from the state it would have had).
"""
from __future__ import annotations

import inspect
import operator
import sys
import threading
import time

import torch
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
          "_global_backward_pre_hooks", "_global_buffer_registration_hooks", "_global_module_registration_hooks",
          "_global_parameter_registration_hooks", "_global_forward_hooks_always_called",
          "_global_forward_hooks_with_kwargs")


def _native():
    """The C++ meter's module where it is loaded, else None."""
    native = sys.modules.get("cemabench.protocol.native")
    return native._loaded.get("module") if native is not None else None


def _record_function() -> bool:
    """Whether PyTorch's RecordFunction is on on this thread (the guard's callback runs only there); True where the C++
    meter is not loaded (nothing reads it)."""
    native = _native()
    return native.record_function_enabled() if native is not None else True


_FLAGS = {  # name: (read, write)
    "grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "record function": (_record_function, torch.autograd._enable_record_function),
    "anomaly detection": (torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    "default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "deterministic algorithms": (torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    "float32 matmul precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "intra-op threads": (torch.get_num_threads, torch.set_num_threads),
    "cudnn enabled": (lambda: torch.backends.cudnn.enabled, lambda v: setattr(torch.backends.cudnn, "enabled", v)),
    "cudnn benchmark": (lambda: torch.backends.cudnn.benchmark,
                        lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    "cudnn deterministic": (lambda: torch.backends.cudnn.deterministic,
                            lambda v: setattr(torch.backends.cudnn, "deterministic", v)),
    "cudnn tf32": (lambda: torch.backends.cudnn.allow_tf32, lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "cuda matmul tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                         lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
}

CHECKED = (*_FLAGS, "inference mode", "global module hooks", "dispatch modes", "function modes", "meters entered",
           "kernels for the meter's key")


METER_KEY = "TESTING_ONLY_GenericMode"  # the dispatch key of the C++ meter (cemabench.protocol.native_meter.cpp)


def kernels_for_the_meters_key() -> list[str]:
    """Ops with a kernel of their own for the C++ meter's dispatch key (a plugin's ``torch.library`` registration):
    the meter's fallback does not run for them. About 70 us: checked when a unit builds its meters and after it."""
    return sorted(torch._C._dispatch_get_registrations_for_dispatch_key(METER_KEY))


def _meters_entered() -> int:
    """How many C++ meters are entered (none outside a step); 0 where it is not loaded."""
    native = _native()
    return native.depth() if native is not None else 0


def snapshot() -> dict:
    """The process-wide state a unit must leave as it found it."""
    state = {name: read() for name, (read, _) in _FLAGS.items()}
    state["inference mode"] = torch.is_inference_mode_enabled()
    state["global module hooks"] = {name: tuple(getattr(_module, name, {})) for name in _HOOKS}
    state["dispatch modes"] = len(_get_current_dispatch_mode_stack())
    state["function modes"] = torch._C._len_torch_function_stack()
    state["meters entered"] = _meters_entered()
    state["kernels for the meter's key"] = kernels_for_the_meters_key()
    return state


def restore(before: dict) -> list[str]:
    """Put back what differs from ``before`` (where it can be put back) and say what it was."""
    after = snapshot()
    changed = []
    for name, (_, write) in _FLAGS.items():
        if after[name] != before[name]:
            changed.append(f"{name} {after[name]} (was {before[name]})")
            write(before[name])
    hooks = {name: set(after["global module hooks"][name]) - set(before["global module hooks"][name])
             for name in _HOOKS}
    for name, added in hooks.items():
        for key in added:
            getattr(_module, name).pop(key, None)
    if any(hooks.values()):
        kinds = [f"{len(added)} {name.removeprefix('_global_').replace('_', ' ')}" for name, added in hooks.items()
                 if added]
        changed.append("global module hooks left registered: " + ", ".join(kinds))
    added = sorted(set(after["kernels for the meter's key"]) - set(before["kernels for the meter's key"]))
    if added:
        changed.append(f"kernels registered for the C++ meter's dispatch key ({', '.join(added[:3])}; they cannot be "
                       f"removed from outside: no later unit runs in this process)")
    if after["meters entered"] != before["meters entered"]:
        changed.append(f"{after['meters entered'] - before['meters entered']} meter(s) left entered")
        _native().reset()
    if after["inference mode"] != before["inference mode"]:
        changed.append(f"inference mode {after['inference mode']} (was {before['inference mode']}; cannot be undone "
                       f"from outside its context)")
    for kind, length, pop in (("dispatch", lambda: len(_get_current_dispatch_mode_stack()),
                               torch._C._pop_torch_dispatch_stack),
                              ("function", torch._C._len_torch_function_stack, torch._C._pop_torch_function_stack)):
        left = after[f"{kind} modes"] - before[f"{kind} modes"]
        if left > 0:
            changed.append(f"{left} torch {kind} mode(s) left on the stack")
            while length() > before[f"{kind} modes"]:
                pop()
    return changed


# The harness's own code: a plugin module that replaces a guard's method when it is imported (ComputeMeter.protect,
# ForwardOnlyEdge._changed) would run every later unit unguarded, in its process and in the workers forked from it.
HARNESS_MODULES = ("cemabench.method", "cemabench.protocol")
_SEALED: dict[str, object] = {}


def _harness_code() -> dict[str, tuple]:
    """Every function, class and method (and property, classmethod, staticmethod) defined in the harness modules,
    by qualified name: where it is found (module, attribute, member) and what a unit must find there unreplaced."""
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not any(name == m or name.startswith(m + ".") for m in HARNESS_MODULES):
            continue
        for attr, value in vars(module).items():
            if getattr(value, "__module__", None) != name or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            found[f"{name}.{attr}"] = ((name, attr, None), _identity(value))
            if inspect.isclass(value):
                for member, inner in vars(value).items():
                    if inspect.isfunction(inner) or isinstance(inner, (property, classmethod, staticmethod)):
                        found[f"{name}.{attr}.{member}"] = ((name, attr, member), _identity(inner))
    for name, module in list(sys.modules.items()):  # the C++ meter's methods, as its extension defines them
        if name.startswith("cemabench_meter_") and hasattr(module, "Meter"):
            found.update({f"{name}.Meter.{k}": ((name, "Meter", k), _identity(v)) for k, v in vars(module.Meter).items()
                          if k[:2] != "__"})
    return found


_MISSING = object()


def _identity(obj) -> tuple:
    """The object, and what a plugin can swap inside it while keeping the object: for a function (or the function of
    a static or class method) the function object, its code, defaults, keyword defaults and closure cells' contents;
    for a property each accessor (and a function accessor's parts). ``staticmethod.__init__`` and
    ``property.__init__`` can be called again on the recorded object."""
    if isinstance(obj, property):
        parts: list = [obj]
        for accessor in (obj.fget, obj.fset, obj.fdel):
            parts += _function_parts(accessor) if inspect.isfunction(accessor) else (accessor,)
        return tuple(parts)
    function = getattr(obj, "__func__", obj)
    if not inspect.isfunction(function):
        return (obj,)
    return (obj, *_function_parts(function))


def _function_parts(function) -> tuple:
    return (function, function.__code__, function.__defaults__, function.__kwdefaults__, *_cells(function))


def _cells(function) -> tuple:
    """The contents of a function's closure cells (None for an empty one)."""
    cells = []
    for cell in function.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            cells.append(None)
    return tuple(cells)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def seal_harness() -> None:
    """Record the harness's code as imported (cemabench.protocol does this once, before any plugin runs; the C++
    meter, once more when it is loaded: only what was not recorded yet is added)."""
    _SEALED.update({k: v for k, v in _harness_code().items() if k not in _SEALED})


def _entry_replaced(path: tuple, value: tuple) -> bool:
    """Whether what is at ``path`` (module, attribute, member) is no longer the recorded ``value`` (its
    :func:`_identity`): looked up where it was recorded (a module replaced in ``sys.modules`` replaces all of its
    code). Whatever a replacement raises when it is looked at counts as replaced."""
    module_name, attr, member = path
    try:
        module = sys.modules.get(module_name)
        found = _MISSING if module is None else vars(module).get(attr, _MISSING)
        if member is not None and found is not _MISSING:
            found = vars(found).get(member, _MISSING)
        return found is not value[0] or not _same(_identity(found), value)
    except Exception:  # noqa: BLE001 - no longer a class, an accessor that raises: not what was recorded
        return True


def _watched(value: tuple) -> list[tuple[object, str, object]]:
    """(object, attribute, recorded value) for what :func:`_identity` recorded inside a recorded object, read from
    the record (never from the object as it is now)."""
    obj, out = value[0], []
    if len(value) == 1:  # recorded as the object alone
        return out

    def function(at: int) -> int:  # the parts of the function recorded at value[at]; the position after them
        f, code, defaults, kwdefaults = value[at:at + 4]
        cells = value[at + 4:at + 4 + len(f.__closure__ or ())]
        out.extend([(f, "__code__", code), (f, "__defaults__", defaults), (f, "__kwdefaults__", kwdefaults),
                    *((cell, "cell_contents", c) for cell, c in zip(f.__closure__ or (), cells))])
        return at + 4 + len(cells)

    if isinstance(obj, property):
        at = 1
        for name in ("fget", "fset", "fdel"):
            out.append((obj, name, value[at]))
            at = function(at) if inspect.isfunction(value[at]) else at + 1
    elif len(value) > 1:
        if value[1] is not obj:  # a static or class method's function
            out.append((obj, "__func__", value[1]))
        function(1)
    return out


_PLAN: list = []  # [(the _SEALED it was made from, its length), holders, watched] (see _plan)


def _plan() -> tuple:
    """The record arranged for checking in C loops (``operator.itemgetter``, ``map``): per holder (a module's
    namespace, or a class's) the names recorded in it and the objects recorded there; and per attribute, the
    recorded objects that have it and what it was (:func:`_watched`). Remade when the record changes."""
    if _PLAN and _PLAN[0][0] is _SEALED and _PLAN[0][1] == len(_SEALED):
        return _PLAN[1], _PLAN[2]
    holders: dict[tuple, list] = {}
    watched: dict[str, tuple[list, list]] = {}
    for (module_name, attr, member), value in _SEALED.values():
        holder, key = ((module_name, None), attr) if member is None else ((module_name, attr), member)
        holders.setdefault(holder, []).append((key, value[0]))
        for obj, name, recorded in _watched(value):
            objects, values = watched.setdefault(name, ([], []))
            objects.append(obj)
            values.append(recorded)
    arranged = [(holder, operator.itemgetter(*[k for k, _ in entries]), [o for _, o in entries])
                for holder, entries in holders.items()]
    attributes = [(operator.attrgetter(name), objects, values) for name, (objects, values) in watched.items()]
    _PLAN[:] = [(_SEALED, len(_SEALED)), arranged, attributes]
    return arranged, attributes


def _holds(module_name: str, cls: str | None, getter, objects: list) -> bool:
    """Whether a module's namespace (or one of its classes') holds the recorded objects under their names."""
    namespace = vars(sys.modules[module_name])
    found = getter(namespace if cls is None else vars(namespace[cls]))
    return all(map(operator.is_, found if len(objects) > 1 else (found,), objects))


def replaced_harness_code() -> list[str]:
    """The harness functions and methods that are no longer what was recorded (replaced or removed), each looked
    up where it was recorded (:func:`_entry_replaced`). An isolated half asks after every step and a unit before and
    after it, so the common case, nothing replaced, is checked in C loops (about 0.2 ms for the 400-odd entries:
    every recorded object where it was recorded, then what was recorded inside it); when anything differs, every
    entry is looked at on its own."""
    holders, attributes = _plan()
    try:
        same = all(_holds(module_name, cls, getter, objects) for (module_name, cls), getter, objects in holders)
        same = same and all(all(map(operator.is_, map(getter, objects), values))
                            for getter, objects, values in attributes)
    except Exception:  # noqa: BLE001 - a module or class gone, an empty cell, an accessor that raises
        same = False
    if same:
        return []
    return sorted(name for name, (path, value) in _SEALED.items() if _entry_replaced(path, value))


def mode_depths() -> tuple[int, int]:
    """How many torch dispatch and function modes are on their stacks now."""
    return len(_get_current_dispatch_mode_stack()), torch._C._len_torch_function_stack()


def check_modes(depths: tuple[int, int], where: str) -> None:
    """Method code returned with a torch mode still entered (it would see, or answer for, every op the harness runs
    after it: a function mode can make ``numel()`` say 0 to the link's byte count): an error that ends the unit."""
    now = mode_depths()
    if now != depths:
        raise RuntimeError(f"{where} returned with {now[0] - depths[0]} torch dispatch and {now[1] - depths[1]} "
                           f"function mode(s) still entered; leave every mode it enters before returning")


# Threads that method code leaves running after its unit: they could change later units in this process (a hook put
# on another method's model, say), and no harness code can stop a thread. The unit fails, and this process runs no
# more units (a worker process ends; an inline run refuses the rest).
_TAINTED: list[str] = []
THREAD_GRACE_S = 2.0  # how long a unit's leftover threads get to finish (a DataLoader's pin-memory thread, say)


def threads() -> set:
    return set(threading.enumerate())


def threads_left(before: set) -> list[str]:
    """The names of the threads started since ``before`` that are still running after a grace period; records
    them, so that :func:`tainted` says this process is not clean."""
    deadline = time.monotonic() + THREAD_GRACE_S
    for thread in threading.enumerate():
        if thread not in before:
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    if left:
        _TAINTED.append(", ".join(left))
    return left


def tainted() -> str | None:
    """Why this process must run no more units (method code left threads running), or None."""
    return _TAINTED[0] if _TAINTED else None
