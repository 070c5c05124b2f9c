"""Building a TD and its tasks: the one place that turns a description of a VM into a World, a KVM instance
and the tasks the runtime schedules. A Session rebuilds from the same setup to replay or fork a timeline."""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import CodeType
from typing import Any

import attrs

from tdxdbg.engine.gmem import Memslot
from tdxdbg.engine.kvm import TdConfigSpec
from tdxdbg.engine.variants.upstream import Upstream
from tdxdbg.hw.ept import Gpaw
from tdxdbg.hw.insn import GuestProgramFactory
from tdxdbg.hw.machine import Machine
from tdxdbg.hw.tdx.leaves import Seamcall
from tdxdbg.runtime.step import Step
from tdxdbg.runtime.task import Task
from tdxdbg.runtime.world import World

# A host program gets the VM and returns the generator its task runs.
HostProgramFactory = Callable[[Any], Generator[Step, None, Any]]


@attrs.frozen
class VmSetup:
    """Everything needed to build the same VM and tasks again, bit for bit."""

    gpaw: Gpaw = Gpaw.GPAW_48
    sept_ve_disable: bool = True
    runnable: bool = True
    variant: type = Upstream
    memslots: tuple[Memslot, ...] = ()
    private_ranges: tuple[tuple[int, int], ...] = ()
    vcpu_programs: tuple[GuestProgramFactory, ...] = ()
    host_programs: tuple[HostProgramFactory, ...] = ()
    inject: tuple[tuple[Seamcall, int, int], ...] = ()   # (leaf, occurrence, status)


# A task's entry: given the VM (or a copy of it over another World, see clone_vm), the generator the task
# runs from its start, or from any of its quiescent points when the World is as it was there.
TaskEntry = Callable[[Any], Generator[Step, None, Any]]


@attrs.define
class BuiltVm:
    machine: Machine
    kvm: Any
    tasks: list[Task]
    entries: dict[str, TaskEntry] = attrs.Factory(dict)


def clone_vm(kvm: Any, world: World) -> Any:
    """A copy of the VM's object graph over `world` (the objects hold configuration only; the state is in the
    World): tasks made from it by their entries read and write `world`, never the original's."""
    machine = copy.copy(kvm.machine)
    machine.world = world
    memory = machine.memory = copy.copy(kvm.memory)
    memory.world = world
    module = machine.tdx = copy.copy(kvm.tdx_module)
    module.world = world
    module.memory = memory
    other = copy.copy(kvm)
    other.machine = machine
    other.world = world
    other.memory = memory
    other.tdx_module = module
    other.vcpus = [v.rebind(other) for v in kvm.vcpus]
    return other


def _vcpu_entry(index: int) -> TaskEntry:
    return lambda kvm: kvm.vcpu_thread(kvm.vcpus[index])


def build_vm(setup: VmSetup) -> BuiltVm:
    """A fresh machine, the VM with its memslots and attributes, and tasks vcpu0.. then host0.."""
    machine = Machine()
    spec = TdConfigSpec(gpaw=setup.gpaw, sept_ve_disable=setup.sept_ve_disable, runnable=setup.runnable)
    kvm = setup.variant(machine, spec)
    for slot in setup.memslots:
        kvm.add_memslot(slot)
    for start, end in setup.private_ranges:
        kvm.set_private_ranges(start, end, True)
    for leaf, occurrence, status in setup.inject:
        machine.tdx.inject[(leaf, occurrence)] = status
    tasks: list[Task] = []
    entries: dict[str, TaskEntry] = {}
    for factory in setup.vcpu_programs:
        vcpu = kvm.create_vcpu(factory)
        entries[vcpu.name] = _vcpu_entry(vcpu.index)
        tasks.append(Task(vcpu.name, kvm.vcpu_thread(vcpu), kind="vcpu"))
    for i, factory in enumerate(setup.host_programs):
        entries[f"host{i}"] = factory
        tasks.append(Task(f"host{i}", factory(kvm), kind="host"))
    machine.world.take_effects()
    return BuiltVm(machine, kvm, tasks, entries)


VARIANT_MODULES = {
    "upstream": ("tdxdbg.engine.variants.upstream", "Upstream"),
    "v6.16": ("tdxdbg.engine.variants.v6_16", "V6_16"),
    "v7": ("tdxdbg.engine.variants.v7", "V7"),
    "no-freeze": ("tdxdbg.engine.variants.broken", "NoFreeze"),
    "zap-without-track": ("tdxdbg.engine.variants.broken", "ZapWithoutTrack"),
    "atomic-mirror-zap": ("tdxdbg.engine.variants.broken", "AtomicMirrorZap"),
}


class VariantError(Exception):
    pass


def variant_names() -> list[str]:
    return list(VARIANT_MODULES)


# A user's variant file runs when it is imported: one that loops is stopped after this long (on the main
# thread, where both `tdxdbg run` and the debugger load scenarios). Not engine time: the engine stays
# deterministic; this only bounds how long a user's file may take to define its class.
VARIANT_IMPORT_SECONDS = 10.0
_TIMER_REPEAT_SECONDS = 0.5   # the timer fires again until the import stops, in case the file catches it once
_user_modules: dict[tuple[str, int, int], Any] = {}


class _ImportTooLong(BaseException):
    """Raised in a variant file's import by the timer (a BaseException, so `except Exception` does not stop it)."""


@contextlib.contextmanager
def _import_deadline(seconds: float) -> Iterator[None]:
    """Raise _ImportTooLong in the code running under it after `seconds` (main thread only; elsewhere, no bound)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise _ImportTooLong

    old_handler = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, _TIMER_REPEAT_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


def _text(value: object, limit: int = 200) -> str:
    """A value from a user's file for a message: never raising (a huge int, a broken __str__), cut to `limit`."""
    try:
        text = repr(value) if value is None or isinstance(value, int | str) else str(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


def _import_user_file(path: Path) -> Any:
    """Execute a user's variant file once per version of it (path, mtime, size): the loader's check and the
    builder share the module. Every way the file can fail, `sys.exit` and a loop included, is a VariantError."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _user_modules:
        return _user_modules[key]
    mod_name = f"tdxdbg_user_variant_{len(_user_modules)}_{abs(hash(key))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise VariantError(f"{path}: cannot load variant: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        with _import_deadline(VARIANT_IMPORT_SECONDS):
            module_spec.loader.exec_module(module)
    except _ImportTooLong:
        del sys.modules[mod_name]
        raise VariantError(f"{path}: cannot load variant: importing the file did not finish within "
                           f"{VARIANT_IMPORT_SECONDS:g} seconds") from None
    except SystemExit as exc:
        del sys.modules[mod_name]
        raise VariantError(f"{path}: cannot load variant: the file called sys.exit({_text(exc.code)}) while "
                           "being imported") from None
    except KeyboardInterrupt:
        del sys.modules[mod_name]
        raise
    except BaseException as exc:  # a user's file: report, never a traceback
        del sys.modules[mod_name]
        raise VariantError(f"{path}: cannot load variant: {type(exc).__name__}: {_text(exc)}") from None
    _user_modules[key] = module
    return module


def load_variant(spec: str, base_dir: Path | None = None) -> type:
    """A shipped variant by name, or `path/to/file.py:ClassName` (relative to `base_dir`)."""
    if spec in VARIANT_MODULES:
        module_name, cls_name = VARIANT_MODULES[spec]
        cls = getattr(importlib.import_module(module_name), cls_name)
        check_override_points(cls)
        return cls
    path_text, sep, cls_name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py"):
        raise VariantError(f"unknown variant {spec!r}: expected one of {', '.join(VARIANT_MODULES)} "
                           "or path/to/file.py:ClassName")
    path = Path(path_text)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        if not path.exists():
            raise VariantError(f"variant file {path} does not exist")
        if not path.is_file():
            raise VariantError(f"variant file {path} is not a regular file")
    except OSError as exc:  # a name too long, a loop of symbolic links
        raise VariantError(f"variant file {_text(str(path))}: {exc.strerror or type(exc).__name__}") from None
    module = _import_user_file(path)
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Upstream):
        raise VariantError(f"{path}: {cls_name!r} is not a class derived from "
                           "tdxdbg.engine.variants.upstream.Upstream")
    check_override_points(cls)
    return cls


def override_points(base: type = Upstream) -> frozenset[str]:
    """What a variant may override: every method and class attribute the engine classes define (KvmBase ..
    VcpuOps, the classes of `Upstream`'s MRO), private helpers included. The engine calls each of them through
    `self`, so an override replaces it everywhere. Dunder names are not override points."""
    names: set[str] = set()
    for klass in base.__mro__:
        if klass is object:
            continue
        names.update(n for n in vars(klass) if not (n.startswith("__") and n.endswith("__")))
    return frozenset(names)


def _names_used(code: CodeType) -> set[str]:
    """Attribute and global names a function's code (and the code nested in it) refers to."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            out |= _names_used(const)
    return out


def _code_of(value: Any) -> CodeType | None:
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return getattr(value, "__code__", None)


def check_override_points(cls: type, base: type = Upstream) -> None:
    """Refuse a variant that defines a name the engine never uses and the variant itself never refers to: a
    typo of an override point, or a name Python mangled (`__x` in a class body is `_Class__x`), which the
    engine would silently never call. Helpers the variant calls itself are fine."""
    points = override_points(base)
    own = [klass for klass in cls.__mro__ if klass not in base.__mro__]
    used: set[str] = set()
    for klass in own:
        for value in vars(klass).values():
            code = _code_of(value)
            if code is not None:
                used |= _names_used(code)
    for klass in own:
        for name, value in vars(klass).items():
            if (name.startswith("__") and name.endswith("__")) or name in points or name in used:
                continue
            code = _code_of(value)
            where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else klass.__module__
            shown = name
            hint = ""
            mangled = f"_{klass.__name__.lstrip('_')}__"
            if name.startswith(mangled):
                shown = name[len(mangled) - 2:]
                hint = (f" ({shown} is name-mangled by Python to {name}; the engine spells the kernel's "
                        f"{shown} with one underscore: {shown[1:]})")
            else:
                close = difflib.get_close_matches(name, points, n=1)
                if close:
                    hint = f" (did you mean {close[0]}?)"
            raise VariantError(f"{where}: {klass.__name__}.{shown} is not an override point: the engine never "
                               f"calls it and the variant does not use it{hint}. Override points are the "
                               "methods of the engine classes (docs/variants.md)")
