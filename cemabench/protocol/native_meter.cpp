// The meter's per-op work in C++ (cemabench.protocol.native): what cemabench.protocol.meter.ComputeMeter does in a
// Python TorchDispatchMode, done in a boxed dispatcher fallback, so that an op that carries no FLOPs and writes
// nothing costs about a microsecond instead of a Python call.
//
// Where it sits: a fallback on the dispatch key TESTING_ONLY_GenericMode, which is included in the thread's local
// dispatch key set while a meter is entered (the autograd engine carries that set into backward, also on its own
// threads). That key sits above Autograd, so it sees composite ops before they decompose; it keeps seeing the ops a
// composite op is made of (PyTorch's CompositeImplicitAutograd kernels, and ops outside the aten namespace, run
// with the key still included) and runs every other aten op below itself with the key excluded. It therefore sees
// the ops a Python dispatch mode sees after decomposing composite ops, which is what the Python meter counts.
//
// Per op: with a guard (any entered meter that guards), refuse a backward kernel (an autograd node is running, or an
// op named *_backward*), an optimizer kernel (_foreach_*_ and _fused_*) and an in-place write into a protected
// storage (any address range of it) or into a leaf that holds a gradient; every entered meter counts the ops that
// have a FLOP formula in torch.utils.flop_counter (their names are given by Python, once) by calling back into
// Python with the op's arguments and outputs, where the formula runs (once per argument shapes). Nothing else
// crosses into Python. A refusal raises the Python exception class given at construction, with the same message as
// the Python meter's, and is counted: the counts and messages can only grow, so code that catches the exception is
// still refused when its step ends.
#include <torch/python.h>
#include <torch/csrc/autograd/node.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <c10/util/SmallVector.h>

#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

constexpr auto kKey = c10::DispatchKey::TESTING_ONLY_GenericMode;

struct OpInfo {
  std::string name;  // "aten::mm.out"
  bool formula = false;
  bool cacheable = true;  // its formula reads only shapes and scalars (attention formulas read tensor values)
  bool optimizer = false;
  bool backward = false;
  bool transparent = false;  // composite or outside aten: the ops inside stay visible
  std::vector<size_t> written;  // positions of the arguments it writes to
  size_t arguments = 0;
  std::optional<c10::OperatorHandle> handle;  // the op in the dispatcher (whether a kernel of its own takes the key)
};

struct Meter {
  bool guard = false;
  std::string phase;
  py::object count;  // Python: (name, overload, arguments, outputs) -> FLOPs
  py::object error;  // the exception class a refusal raises
  std::mutex mutex;  // guards what follows: backward may run on the engine's threads
  int64_t flops = 0;  // only grows; the harness reads differences
  int64_t refusals = 0, blinds = 0;  // only grow
  std::map<int64_t, std::string> recent;  // the latest refusals' messages by their number (at most 64)
  std::string last_blind;
  std::map<uintptr_t, std::pair<uintptr_t, std::string>> protected_ranges;  // start -> (end, name)
  int64_t entry_modes = 0;  // Python dispatch modes entered before this meter: the caller's, outside what it meters
};
using MeterPtr = std::shared_ptr<Meter>;

std::once_flag formulas_set;
std::unordered_set<std::string> formula_names;  // set once, before any meter is built

std::mutex ops_mutex;
std::unordered_map<const void*, OpInfo> ops;  // never cleared: references into it stay valid

// The entered meters, innermost last, each with the thread-local inclusion of the key it replaced.
std::mutex stack_mutex;
std::vector<std::pair<MeterPtr, bool>> entered;
using Active = c10::SmallVector<MeterPtr, 4>;

Active active_meters() {
  std::lock_guard<std::mutex> lock(stack_mutex);
  Active out;
  for (const auto& e : entered) out.push_back(e.first);
  return out;
}

const OpInfo& info(const c10::OperatorHandle& op) {
  const void* key = &op.schema();
  std::lock_guard<std::mutex> lock(ops_mutex);
  auto found = ops.find(key);
  if (found != ops.end()) return found->second;
  OpInfo i;
  const auto& schema = op.schema();
  const auto& base = schema.operator_name().name;
  i.name = base + (schema.overload_name().empty() ? "" : "." + schema.overload_name());
  i.formula = formula_names.count(base) > 0;
  i.cacheable = base.find("attention") == std::string::npos;
  auto colons = base.find("::");
  std::string space = base.substr(0, colons), shrt = base.substr(colons + 2);
  i.optimizer = shrt.rfind("_fused_", 0) == 0 || (shrt.rfind("_foreach_", 0) == 0 && shrt.back() == '_');
  i.backward = shrt.find("_backward") != std::string::npos;
  i.transparent = space != "aten" || op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd);
  i.arguments = schema.arguments().size();
  i.handle = op;
  for (size_t a = 0; a < schema.arguments().size(); ++a) {
    const auto& argument = schema.arguments()[a];
    const auto& alias = argument.alias_info();
    // batch norm's running statistics are updated in place, though some of its schemas do not say so
    bool statistics = argument.name() == "running_mean" || argument.name() == "running_var";
    if ((alias && alias->isWrite()) || statistics) i.written.push_back(a);
  }
  return ops.emplace(key, std::move(i)).first->second;
}

void note(Meter& m, const std::string& message) {  // with m.mutex held
  m.recent[m.refusals++] = message;
  if (m.recent.size() > 64) m.recent.erase(m.recent.begin());
}

void remember(const Active& meters, const std::string& message) {
  for (const auto& m : meters) {
    if (!m->guard) continue;
    std::lock_guard<std::mutex> lock(m->mutex);
    note(*m, message);
  }
}

[[noreturn]] void refuse(const Active& meters, const MeterPtr& guard, const std::string& message) {
  remember(meters, message);
  py::gil_scoped_acquire gil;
  PyErr_SetString(guard->error.ptr(), message.c_str());
  throw py::error_already_set();
}

std::pair<uintptr_t, uintptr_t> range_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || t.storage().data() == nullptr) return {0, 0};
  auto start = reinterpret_cast<uintptr_t>(t.storage().data());
  return {start, start + t.storage().nbytes()};
}

// The name of a protected tensor whose memory overlaps this tensor's storage, or nullptr.
const std::string* protected_name(const MeterPtr& m, const at::Tensor& t) {
  auto [start, end] = range_of(t);
  if (start == end) return nullptr;
  auto next = m->protected_ranges.upper_bound(start);
  if (next != m->protected_ranges.end() && next->first < end) return &next->second.second;
  if (next != m->protected_ranges.begin()) {
    auto before = std::prev(next);
    if (before->second.first > start) return &before->second.second;
  }
  return nullptr;
}

// The guard's refusal for an op that writes into this tensor, or "".
std::string write_refusal(const MeterPtr& m, const OpInfo& i, const at::Tensor& t, const char* where) {
  if (!t.defined()) return "";
  if (const std::string* hit = protected_name(m, t))
    return i.name + where + " wrote into the edge parameter " + *hit + " during " + m->phase;
  if (t.is_leaf() && t.grad().defined())
    return i.name + where + " updated a parameter from its gradient (an optimizer step, on a model kept beside the "
           "edge?) during " + m->phase;
  return "";
}

// The guard's refusal for an op with these arguments, or "" (``where`` follows the op's name: "" or " on a thread").
std::string guard_refusal(const MeterPtr& m, const OpInfo& i, c10::ArrayRef<c10::IValue> arguments,
                          const char* where) {
  if (torch::autograd::get_current_node() != nullptr || i.backward)
    return "a backward kernel (" + i.name + ")" + where + " ran during " + m->phase;
  if (i.optimizer) return "an optimizer kernel (" + i.name + ")" + where + " ran during " + m->phase;
  for (size_t a : i.written) {
    if (a >= arguments.size()) continue;
    const auto& v = arguments[a];
    std::string refusal;
    if (v.isTensor()) refusal = write_refusal(m, i, v.toTensor(), where);
    if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) {
        if (refusal.empty()) refusal = write_refusal(m, i, t, where);
      }
    }
    if (!refusal.empty()) return refusal;
  }
  return "";
}

MeterPtr guarding(const Active& meters) {
  for (auto it = meters.rbegin(); it != meters.rend(); ++it) {
    if ((*it)->guard) return *it;
  }
  return nullptr;
}

// The op an event of the callback is about, found by the address of its name (the schema's own string: one per op
// and overload, for as long as the op is registered) and checked against the names, so that a name that now lives
// where a removed op's did is looked up again. nullptr: not an op (a user's scope, an autograd node's event).
std::mutex events_mutex;
struct Event {
  std::string name, overload;
  const OpInfo* info;
};
std::unordered_map<const char*, Event> events;

const OpInfo* event_info(const at::RecordFunction& fn) {
  if (fn.scope() != at::RecordScope::FUNCTION) return nullptr;
  const char* key = fn.name();
  {
    std::lock_guard<std::mutex> lock(events_mutex);
    auto found = events.find(key);
    if (found != events.end() && found->second.name == key && found->second.overload == fn.overload_name())
      return found->second.info;
  }
  auto name = fn.operator_name();
  if (!name) return nullptr;
  auto op = c10::Dispatcher::singleton().findOp(*name);
  if (!op) return nullptr;
  const OpInfo* i = &info(*op);
  std::lock_guard<std::mutex> lock(events_mutex);
  events[key] = {name->name, name->overload_name, i};
  return i;
}

// A thread the method's code started does not carry the meter's key, and code can exclude the key on its own
// thread: while a guarding meter is entered, every op on every thread passes this RecordFunction callback, which
// refuses there what the fallback refuses where it sees the op. Exceptions thrown from such a callback are dropped by
// PyTorch, so the refusal is counted, and the meter's owner raises it when the step ends. It needs the op's inputs
// (a write into an edge parameter, or into one that holds a gradient), so PyTorch boxes every op's inputs while it is
// registered, the guarded thread's own included; that thread's ops return at once, unless the op has a kernel of its
// own for the meter's key (a plugin's torch.library registration, made during the step and removed before it ends,
// where the unit's checks before and after it would not see it): that kernel runs in place of the fallback, so the
// op is neither counted nor guarded, and it is refused.
//
// On a thread that entered a meter, the key is off only where the fallback took it off to run an op below itself
// (`below_depth`), or where Python code behind a dispatch mode or tensor subclass runs (the fallback marks those
// blind, or they are the caller's own instrument's). Anywhere else the step's code took it off itself, and its ops
// would count no FLOPs: refused.
// The callback runs only where PyTorch's RecordFunction is on, a thread's own switch: code that switches it off on the
// step's thread (torch.autograd._enable_record_function) is refused where the meter sees that, at an op or when the
// step ends. Code that switches it off, takes the key off, runs ops and puts both back between two metered ops is not
// seen (README: what the guard does not see).
const std::string record_function_off = " ran with PyTorch's RecordFunction switched off on the thread of ";
thread_local int entered_depth = 0;  // meters this thread entered and has not left
thread_local int below_depth = 0;  // ops the fallback is running below itself on this thread

struct Below {
  explicit Below(bool on) : on(on) { below_depth += on; }
  ~Below() { below_depth -= on; }
  bool on;
};

std::unique_ptr<at::ObserverContext> on_any_thread(const at::RecordFunction& fn) {
  bool included = c10::impl::tls_is_dispatch_key_included(kKey);
  bool passes = included && !c10::impl::tls_is_dispatch_key_excluded(kKey);  // through the meter's key
  if (passes && entered_depth == 0) return nullptr;
  const OpInfo* i = event_info(fn);
  if (i == nullptr) return nullptr;
  if (passes) {
    if (!i->handle || !i->handle->hasKernelForDispatchKey(kKey)) return nullptr;
    Active meters = active_meters();
    MeterPtr guard = guarding(meters);
    if (guard != nullptr)
      remember(meters, i->name + " ran through a kernel registered for the meter's dispatch key on the thread of " +
                           guard->phase + ", in place of the meter: neither counted nor guarded (a torch.library "
                           "registration for TESTING_ONLY_GenericMode)");
    return nullptr;
  }
  Active meters = active_meters();
  MeterPtr guard = guarding(meters);
  if (guard == nullptr) return nullptr;
  if (entered_depth > 0 && below_depth == 0) {
    remember(meters, i->name + " ran with the meter's dispatch key " + (included ? "excluded" : "switched off") +
                         " on the thread of " + guard->phase + ", where no FLOP is counted");
    return nullptr;
  }
  std::string refusal = guard_refusal(guard, *i, fn.inputs(), included ? " below the meter" : " on a thread");
  if (!refusal.empty()) remember(meters, refusal);
  return nullptr;
}
at::CallbackHandle thread_callback = 0;

// An isolated edge half (cemabench.protocol.isolation) is the edge for its whole life: no backward or optimizer kernel
// may run in it at any time, on any thread, also between the edge's steps (while the cloud step runs, say), where no
// guard is entered. This callback, registered for the process's life, counts such a kernel (by the op's name) as a
// refusal of `process_guard`, which the half reads after each call.
MeterPtr process_guard;

std::unique_ptr<at::ObserverContext> on_edge_process(const at::RecordFunction& fn) {
  if (c10::impl::tls_is_dispatch_key_included(kKey) && !c10::impl::tls_is_dispatch_key_excluded(kKey))
    return nullptr;  // a guarded step's own op: the fallback refuses it there
  const OpInfo* i = event_info(fn);
  if (i == nullptr || !(i->backward || i->optimizer || torch::autograd::get_current_node() != nullptr)) return nullptr;
  std::string refusal = guard_refusal(process_guard, *i, {}, "");
  std::lock_guard<std::mutex> lock(process_guard->mutex);
  note(*process_guard, refusal);
  return nullptr;
}

// Where the ops that code runs pass below this key or more than once: Python code behind __torch_dispatch__ (a
// dispatch mode, a tensor subclass) runs with every key above Python excluded, torch.func's transforms redispatch
// an op once per level, and forward-mode AD computes tangents inside the Autograd kernel, below the key. The Python
// meter, a dispatch mode itself, sees all three; this one says it cannot. A dispatch mode entered before the meter
// (the caller's instrument, outside the metered code) sees the metered ops after the meter has: only the ops its
// own handler runs are not metered, and they are not the metered code's.
bool hidden_python(int64_t entry_modes, const torch::jit::Stack* stack, size_t arguments) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > entry_modes) return true;
  auto python = c10::DispatchKeySet(c10::DispatchKey::Python);
  for (size_t a = stack->size() - arguments; a < stack->size(); ++a) {
    const auto& v = (*stack)[a];
    if (v.isTensor() && v.toTensor().defined() && !(v.toTensor().key_set() & python).empty()) return true;
    if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) {
        if (t.defined() && !(t.key_set() & python).empty()) return true;
      }
    }
  }
  return false;
}

bool has_tangent(const torch::jit::Stack* stack, size_t arguments) {
  for (size_t a = stack->size() - arguments; a < stack->size(); ++a) {
    const auto& v = (*stack)[a];
    if (v.isTensor() && v.toTensor().defined() && v.toTensor()._fw_grad(0).defined()) return true;
  }
  return false;
}

const c10::DispatchKeySet hidden_keys({c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                                       c10::DispatchKey::FuncTorchDynamicLayerBackMode,
                                       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                       c10::DispatchKey::FuncTorchVmapMode, c10::DispatchKey::Batched,
                                       c10::DispatchKey::VmapMode, c10::DispatchKey::Functionalize,
                                       c10::DispatchKey::PreDispatch, c10::DispatchKey::PythonDispatcher});

void blind(const Active& meters, const std::string& what) {
  for (const auto& m : meters) {
    std::lock_guard<std::mutex> lock(m->mutex);
    ++m->blinds;
    m->last_blind = what;
  }
}

// FLOPs by (op, argument and output shapes and values): a formula depends on nothing else. A key is a flat list of
// tagged integers; an argument of another kind makes a call uncacheable.
struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = k.size();
    for (int64_t v : k) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};
std::mutex counted_mutex;
std::unordered_map<std::vector<int64_t>, int64_t, KeyHash> counted;

bool add_key(std::vector<int64_t>& key, const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (!t.defined()) {
      key.push_back(-2);
      return true;
    }
    key.push_back(-3);
    key.push_back(t.dim());
    for (auto s : t.sizes()) key.push_back(s);
  } else if (v.isNone()) {
    key.push_back(-4);
  } else if (v.isInt()) {
    key.push_back(-5);
    key.push_back(v.toInt());
  } else if (v.isBool()) {
    key.push_back(-6);
    key.push_back(v.toBool());
  } else if (v.isDouble()) {
    key.push_back(-7);
    double d = v.toDouble();
    int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    key.push_back(bits);
  } else if (v.isIntList()) {
    auto l = v.toIntList();
    key.push_back(-8);
    key.push_back(l.size());
    for (int64_t x : l) key.push_back(x);
  } else if (v.isTensorList()) {
    auto l = v.toTensorList();
    key.push_back(-9);
    key.push_back(l.size());
    for (const at::Tensor& t : l) {
      if (!add_key(key, c10::IValue(t))) return false;
    }
  } else if (v.isList() || v.isTuple()) {
    auto l = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    key.push_back(-10);
    key.push_back(l.size());
    for (const auto& x : l) {
      if (!add_key(key, x)) return false;
    }
  } else {
    return false;  // strings, devices, dtypes, generators...: count through Python every time
  }
  return true;
}

thread_local int inside_formula = 0;  // formula ops running below this thread's meter, visible ops inside them

// Run a formula op below the meter and add its FLOPs to every entered meter.
void count(const Active& meters, const c10::OperatorHandle& op, torch::jit::Stack* stack, const OpInfo& i,
           c10::DispatchKeySet below, bool nested) {
  c10::SmallVector<c10::IValue, 16> arguments(stack->end() - i.arguments, stack->end());  // no allocation per op
  if (nested) {
    struct Depth {
      Depth() { ++inside_formula; }
      ~Depth() { --inside_formula; }
    } depth;
    op.redispatchBoxed(below, stack);
  } else {
    op.redispatchBoxed(below, stack);
  }
  const auto& schema = op.schema();
  size_t returns = schema.returns().size();
  thread_local std::vector<int64_t> key;  // its capacity kept from op to op
  key.clear();
  key.push_back(reinterpret_cast<int64_t>(&schema));
  bool cacheable = i.cacheable;
  for (const auto& v : arguments) cacheable = cacheable && add_key(key, v);
  for (size_t r = stack->size() - returns; r < stack->size(); ++r) cacheable = cacheable && add_key(key, (*stack)[r]);
  int64_t flops = -1;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(counted_mutex);
    auto found = counted.find(key);
    if (found != counted.end()) flops = found->second;
  }
  if (flops < 0) {
    std::vector<int64_t> mine(key);  // the formula's Python may run ops that count on this thread
    py::gil_scoped_acquire gil;
    py::list args, outs;
    for (const auto& v : arguments) args.append(torch::jit::toPyObject(v));
    for (size_t r = stack->size() - returns; r < stack->size(); ++r) outs.append(torch::jit::toPyObject((*stack)[r]));
    flops = meters.back()->count(schema.operator_name().name, schema.overload_name(), args, outs).cast<int64_t>();
    if (cacheable) {
      std::lock_guard<std::mutex> lock(counted_mutex);
      counted.emplace(std::move(mine), flops);
    }
  }
  for (const auto& m : meters) {
    std::lock_guard<std::mutex> lock(m->mutex);
    m->flops += flops;
  }
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const OpInfo& i = info(op);
  Active meters = active_meters();
  auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  if (meters.empty()) {
    op.redispatchBoxed(below, stack);
    return;
  }
  MeterPtr guard = guarding(meters);
  bool python = keys.has(c10::DispatchKey::Python) &&
                hidden_python(meters.front()->entry_modes, stack, i.arguments);
  if (python || !(keys & hidden_keys).empty() || (i.formula && has_tangent(stack, i.arguments))) {
    blind(meters, i.name + " (dispatch keys " + c10::toString(keys & (hidden_keys | c10::DispatchKeySet(
                                                                         c10::DispatchKey::Python))) + ")");
  }
  if (guard) {
    std::string refusal = guard_refusal(guard, i, c10::ArrayRef<c10::IValue>(*stack).slice(stack->size() - i.arguments),
                                        "");
    if (!refusal.empty()) refuse(meters, guard, refusal);
    if (!at::isRecordFunctionEnabled()) refuse(meters, guard, i.name + record_function_off + guard->phase);
  }
  // A composite op, an op outside aten, or any op while Python code can run inside it: the ops it issues stay
  // visible, and a formula op's count is its own, not also that of the formula ops it runs inside (the outermost
  // counts, as in the Python meter).
  if (i.transparent || keys.has(c10::DispatchKey::Python)) {
    Below python(keys.has(c10::DispatchKey::Python));  // a handler in Python runs with the key excluded
    if (!i.formula || inside_formula > 0) {
      op.redispatchBoxed(below, stack);
      return;
    }
    count(meters, op, stack, i, below, true);
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard hide(kKey);
  Below hidden(true);
  if (!i.formula || inside_formula > 0) {
    op.redispatchBoxed(below, stack);
    return;
  }
  count(meters, op, stack, i, below, false);
}

// A Python getter that reads one of the meter's fields under its mutex (backward may write them on another thread).
template <typename T>
auto locked(T Meter::*field) {
  return [field](Meter& m) {
    std::lock_guard<std::mutex> lock(m.mutex);
    return m.*field;
  };
}

}  // namespace

TORCH_LIBRARY_IMPL(_, TESTING_ONLY_GenericMode, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_formulas", [](const std::vector<std::string>& names) {
    bool set = false;
    std::call_once(formulas_set, [&] {
      formula_names = std::unordered_set<std::string>(names.begin(), names.end());
      set = true;
    });
    TORCH_CHECK(set, "cemabench: the meter's formulas are set once, when it is loaded");
  });
  module.def("guard_process", [](const MeterPtr& m) {  // once, in an edge half, before any method code is imported
    TORCH_CHECK(!process_guard, "cemabench: a process is guarded once");
    process_guard = m;
    at::addGlobalCallback(at::RecordFunctionCallback(&on_edge_process));
  });
  module.def("record_function_enabled", [] { return at::isRecordFunctionEnabled(); });
  module.def("depth", [] {
    std::lock_guard<std::mutex> lock(stack_mutex);
    return entered.size();
  });
  module.def("reset", [] {  // after a unit whose code left meters entered: none stays, on any thread
    std::lock_guard<std::mutex> lock(stack_mutex);
    entered.clear();
    entered_depth = 0;
    c10::impl::tls_set_dispatch_key_included(kKey, false);
    if (thread_callback != 0) {
      at::removeCallback(thread_callback);
      thread_callback = 0;
    }
  });
  py::class_<Meter, MeterPtr>(module, "Meter")
      .def(py::init([](bool guard, std::string phase, py::object count, py::object error) {
        auto m = std::make_shared<Meter>();
        m->guard = guard;
        m->phase = std::move(phase);
        m->count = std::move(count);
        m->error = std::move(error);
        return m;
      }))
      .def_property_readonly("guard", [](const Meter& m) { return m.guard; })
      .def_property_readonly("phase", [](const Meter& m) { return m.phase; })
      .def("set_phase", [](Meter& m, const std::string& p) {
        std::lock_guard<std::mutex> lock(m.mutex);
        m.phase = p;
      })
      .def_property_readonly("flops", locked(&Meter::flops))
      .def_property_readonly("refusals", locked(&Meter::refusals))
      .def("refusal", [](Meter& m, int64_t number) {  // the message of refusal `number` (0 first), or the oldest kept
        std::lock_guard<std::mutex> lock(m.mutex);
        auto found = m.recent.lower_bound(number);
        return found == m.recent.end() ? std::string() : found->second;
      })
      .def_property_readonly("blinds", locked(&Meter::blinds))
      .def_property_readonly("last_blind", locked(&Meter::last_blind))
      .def("refuse_later", [](Meter& m, const std::string& message) {  // a refusal the harness found itself
        std::lock_guard<std::mutex> lock(m.mutex);
        note(m, message);
      })
      .def("protect", [](Meter& m, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
        std::lock_guard<std::mutex> lock(m.mutex);
        m.protected_ranges.clear();
        for (const auto& nt : tensors) {
          auto [start, end] = range_of(nt.second);
          if (start != end) m.protected_ranges[start] = {end, nt.first};
        }
      })
      .def("enter", [](const MeterPtr& m) {
        std::lock_guard<std::mutex> lock(stack_mutex);
        m->entry_modes = c10::impl::TorchDispatchModeTLS::stack_len();
        entered.emplace_back(m, c10::impl::tls_is_dispatch_key_included(kKey));
        c10::impl::tls_set_dispatch_key_included(kKey, true);
        ++entered_depth;
        if (m->guard && thread_callback == 0)
          thread_callback = at::addGlobalCallback(at::RecordFunctionCallback(&on_any_thread).needsInputs(true));
      })
      .def("exit", [](const MeterPtr& m) {
        std::lock_guard<std::mutex> lock(stack_mutex);
        TORCH_CHECK(!entered.empty() && entered.back().first == m,
                    "cemabench: meters must be left in the order they were entered");
        c10::impl::tls_set_dispatch_key_included(kKey, entered.back().second);
        entered.pop_back();
        if (m->guard && !at::isRecordFunctionEnabled()) {
          std::lock_guard<std::mutex> lock(m->mutex);
          note(*m, "the step" + record_function_off + m->phase);
        }
        entered_depth -= entered_depth > 0;
        bool guards = false;
        for (const auto& e : entered) guards = guards || e.first->guard;
        if (thread_callback != 0 && !guards) {
          at::removeCallback(thread_callback);
          thread_callback = 0;
        }
      });
}
