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
// Per op: with a guard, refuse a backward kernel (an autograd node is running), an optimizer kernel (_foreach_*_ and
// _fused_*) and an in-place write into a protected storage or into a leaf that holds a gradient; count the ops that
// have a FLOP formula in torch.utils.flop_counter (their names are given by Python) by calling back into Python with
// the op's arguments and outputs, where the formula runs (once per argument shapes). Nothing else crosses into
// Python. A refusal raises the Python exception class given at entry, with the same message as the Python meter's.
#include <torch/extension.h>
#include <torch/csrc/autograd/node.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

constexpr auto kKey = c10::DispatchKey::TESTING_ONLY_GenericMode;

struct OpInfo {
  std::string name;  // "aten::mm.out"
  bool formula = false;
  bool optimizer = false;
  bool transparent = false;  // composite or outside aten: the ops inside stay visible
  std::vector<size_t> written;  // positions of the arguments it writes to
  size_t arguments = 0;
};

struct Meter {
  bool guard = false;
  int64_t flops = 0;
  std::unordered_map<const void*, std::string> protected_storages;
  std::string phase = "the edge step";
  std::string violation;
  std::string blind;  // the first op that ran where this meter cannot see (see `hidden_keys`)
  int64_t entry_modes = 0;  // Python dispatch modes entered before this meter: the caller's, outside what it meters
  py::object count;  // Python: (name, overload, arguments, outputs) -> FLOPs
  py::object error;  // the exception class a refusal raises
};

std::unordered_set<std::string> formula_names;  // set before any meter is entered

// FLOPs by (op, argument and output shapes and values): a formula depends on nothing else (as the Python meter's
// cache). A key is a flat list of tagged integers; an argument of another kind makes a call uncacheable.
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
std::mutex ops_mutex;
std::unordered_map<const void*, OpInfo> ops;
std::mutex meter_mutex;  // guards flops and violation: backward may run on the engine's threads
Meter* active = nullptr;
std::vector<std::pair<Meter*, bool>> entered;  // what enter() replaced, for exit()

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
  auto colons = base.find("::");
  std::string space = base.substr(0, colons), shrt = base.substr(colons + 2);
  auto ends = [&](const std::string& s) { return !shrt.empty() && shrt.back() == '_'; };
  i.optimizer = shrt.rfind("_fused_", 0) == 0 || (shrt.rfind("_foreach_", 0) == 0 && ends(shrt));
  i.transparent = space != "aten" || op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd);
  i.arguments = schema.arguments().size();
  for (size_t a = 0; a < schema.arguments().size(); ++a) {
    const auto& alias = schema.arguments()[a].alias_info();
    if (alias && alias->isWrite()) i.written.push_back(a);
  }
  return ops.emplace(key, std::move(i)).first->second;
}

void remember(Meter* m, const std::string& message) {
  std::lock_guard<std::mutex> lock(meter_mutex);
  if (m->violation.empty()) m->violation = message;
}

[[noreturn]] void refuse(Meter* m, const std::string& message) {
  remember(m, message);
  py::gil_scoped_acquire gil;
  PyErr_SetString(m->error.ptr(), message.c_str());
  throw py::error_already_set();
}

const void* storage_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  return t.storage().data_ptr().get();
}

// The guard's refusal for an op with these arguments, or "" (``where`` follows the op's name: "" or " on a thread").
std::string guard_refusal(Meter* m, const OpInfo& i, c10::ArrayRef<c10::IValue> arguments, const char* where) {
  if (torch::autograd::get_current_node() != nullptr)
    return "a backward kernel (" + i.name + ")" + where + " ran during " + m->phase;
  if (i.optimizer) return "an optimizer kernel (" + i.name + ")" + where + " ran during " + m->phase;
  for (size_t a : i.written) {
    if (a >= arguments.size()) continue;
    const auto& v = arguments[a];
    std::vector<at::Tensor> targets;
    if (v.isTensor()) targets.push_back(v.toTensor());
    if (v.isTensorList()) targets = v.toTensorList().vec();
    for (const at::Tensor& t : targets) {
      const void* s = storage_of(t);
      auto hit = m->protected_storages.find(s);
      if (s != nullptr && hit != m->protected_storages.end())
        return i.name + where + " wrote into the edge parameter " + hit->second + " during " + m->phase;
      if (t.defined() && t.requires_grad() && t.is_leaf() && t.grad().defined())
        return i.name + where + " updated a parameter from its gradient (an optimizer step, on a model kept beside "
               "the edge?) during " + m->phase;
    }
  }
  return "";
}

// A thread the method's code started does not carry the meter's key: while a guarding meter is entered, every op on
// every thread passes this RecordFunction callback, which refuses on the others what the fallback refuses on the
// metered ones. Exceptions thrown from such a callback are dropped by PyTorch, so the refusal is remembered, and the
// meter raises it when it is left.
std::unique_ptr<at::ObserverContext> on_any_thread(const at::RecordFunction& fn) {
  Meter* m = active;
  if (m == nullptr || !m->guard || c10::impl::tls_is_dispatch_key_included(kKey)) return nullptr;
  auto name = fn.operator_name();
  if (!name) return nullptr;
  auto op = c10::Dispatcher::singleton().findOp(*name);
  if (!op) return nullptr;
  std::string refusal = guard_refusal(m, info(*op), fn.inputs(), " on a thread");
  if (!refusal.empty()) remember(m, refusal);
  return nullptr;
}
at::CallbackHandle thread_callback = 0;

void count(Meter* m, const c10::OperatorHandle& op, torch::jit::Stack* stack, const OpInfo& i,
           c10::DispatchKeySet below, bool nested);
thread_local int inside_formula = 0;  // formula ops running below this thread's meter, visible ops inside them

// Where the ops that code runs pass below this key or more than once: Python code behind __torch_dispatch__ (a
// dispatch mode, a tensor subclass) runs with every key above Python excluded, and torch.func's transforms redispatch
// an op once per level. The Python meter, a dispatch mode itself, handles both; this one says it cannot. A dispatch
// mode entered before the meter (the caller's instrument, outside the metered code) sees the metered ops after the
// meter has: only the ops its own handler runs are not metered, and they are not the metered code's.
bool hidden_python(Meter* m, const torch::jit::Stack* stack, size_t arguments) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() > m->entry_modes) return true;
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

const c10::DispatchKeySet hidden_keys({c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                                       c10::DispatchKey::FuncTorchDynamicLayerBackMode,
                                       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                       c10::DispatchKey::FuncTorchVmapMode, c10::DispatchKey::Batched,
                                       c10::DispatchKey::VmapMode, c10::DispatchKey::Functionalize,
                                       c10::DispatchKey::PreDispatch, c10::DispatchKey::PythonDispatcher});

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const OpInfo& i = info(op);
  Meter* m = active;
  if (m != nullptr && m->blind.empty()) {
    bool python = keys.has(c10::DispatchKey::Python) && hidden_python(m, stack, i.arguments);
    if (python || !(keys & hidden_keys).empty()) {
      std::lock_guard<std::mutex> lock(meter_mutex);
      m->blind = i.name + " (dispatch keys " + c10::toString(keys & (hidden_keys | c10::DispatchKeySet(
                                                                        c10::DispatchKey::Python))) + ")";
    }
  }
  auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  if (m != nullptr && m->guard) {
    std::string refusal = guard_refusal(m, i, c10::ArrayRef<c10::IValue>(*stack).slice(stack->size() - i.arguments), "");
    if (!refusal.empty()) refuse(m, refusal);
  }
  // A composite op, an op outside aten, or any op while Python code can run inside it (a tensor subclass's or a
  // dispatch mode's __torch_dispatch__): the ops it issues stay visible, and a formula op's count is its own, not
  // also that of the formula ops it runs inside (the outermost counts, as in the Python meter).
  if (i.transparent || keys.has(c10::DispatchKey::Python)) {
    if (m == nullptr || !i.formula || inside_formula > 0) {
      op.redispatchBoxed(below, stack);
      return;
    }
    count(m, op, stack, i, below, true);
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard hide(kKey);
  if (m == nullptr || !i.formula || inside_formula > 0) {
    op.redispatchBoxed(below, stack);
    return;
  }
  count(m, op, stack, i, below, false);
}

// Run a formula op below the meter and add its FLOPs.
void count(Meter* m, const c10::OperatorHandle& op, torch::jit::Stack* stack, const OpInfo& i,
           c10::DispatchKeySet below, bool nested) {
  std::vector<c10::IValue> arguments(stack->end() - i.arguments, stack->end());
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
  std::vector<int64_t> key{reinterpret_cast<int64_t>(&schema)};
  bool cacheable = true;
  for (const auto& v : arguments) cacheable = cacheable && add_key(key, v);
  for (size_t r = stack->size() - returns; r < stack->size(); ++r) cacheable = cacheable && add_key(key, (*stack)[r]);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(counted_mutex);
    auto found = counted.find(key);
    if (found != counted.end()) {
      std::lock_guard<std::mutex> lock2(meter_mutex);
      m->flops += found->second;
      return;
    }
  }
  py::gil_scoped_acquire gil;
  py::list args, outs;
  for (const auto& v : arguments) args.append(torch::jit::toPyObject(v));
  for (size_t r = stack->size() - returns; r < stack->size(); ++r) outs.append(torch::jit::toPyObject((*stack)[r]));
  int64_t flops = m->count(schema.operator_name().name, schema.overload_name(), args, outs).cast<int64_t>();
  if (cacheable) {
    std::lock_guard<std::mutex> lock(counted_mutex);
    counted.emplace(std::move(key), flops);
  }
  std::lock_guard<std::mutex> lock(meter_mutex);
  m->flops += flops;
}

}  // namespace

TORCH_LIBRARY_IMPL(_, TESTING_ONLY_GenericMode, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_formulas", [](const std::vector<std::string>& names) {
    std::lock_guard<std::mutex> lock(ops_mutex);
    formula_names = std::unordered_set<std::string>(names.begin(), names.end());
    ops.clear();
  });
  py::class_<Meter>(module, "Meter")
      .def(py::init([](bool guard, py::object count, py::object error) {
        auto m = new Meter();
        m->guard = guard;
        m->count = std::move(count);
        m->error = std::move(error);
        return m;
      }))
      .def_readonly("guard", &Meter::guard)
      .def_property("phase", [](const Meter& m) { return m.phase; },
                    [](Meter& m, const std::string& p) { m.phase = p; })
      .def_property("violation",
                    [](const Meter& m) -> py::object {
                      if (m.violation.empty()) return py::none();
                      return py::str(m.violation);
                    },
                    [](Meter& m, py::object v) { m.violation = v.is_none() ? "" : v.cast<std::string>(); })
      .def_property("blind",
                    [](const Meter& m) -> py::object {
                      if (m.blind.empty()) return py::none();
                      return py::str(m.blind);
                    },
                    [](Meter& m, py::object v) { m.blind = v.is_none() ? "" : v.cast<std::string>(); })
      .def_property("flops", [](const Meter& m) { return m.flops; }, [](Meter& m, int64_t f) { m.flops = f; })
      .def("protect", [](Meter& m, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
        m.protected_storages.clear();
        for (const auto& nt : tensors) {
          const void* s = storage_of(nt.second);
          if (s != nullptr) m.protected_storages.emplace(s, nt.first);
        }
      })
      .def("enter", [](Meter& m) {
        entered.emplace_back(active, c10::impl::tls_is_dispatch_key_included(kKey));
        m.entry_modes = c10::impl::TorchDispatchModeTLS::stack_len();
        active = &m;
        c10::impl::tls_set_dispatch_key_included(kKey, true);
        if (m.guard && thread_callback == 0)
          thread_callback = at::addGlobalCallback(at::RecordFunctionCallback(&on_any_thread).needsInputs(true));
      })
      .def("exit", [](Meter& m) {
        TORCH_CHECK(!entered.empty() && active == &m, "cemabench: meters must be left in the order they were entered");
        active = entered.back().first;
        c10::impl::tls_set_dispatch_key_included(kKey, entered.back().second);
        entered.pop_back();
        if (thread_callback != 0 && (active == nullptr || !active->guard)) {
          at::removeCallback(thread_callback);
          thread_callback = 0;
        }
      });
}
