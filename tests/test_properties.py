"""Property-based tests (hypothesis): random programs that share two small fake GPUs.

A program is a list of steps: nested scopes (``on_gpu(..., device=, keep=, wait=, timeout=, budget=, prefetch=)``,
whose block may raise, caught outside), ``ondevice.keep`` / ``ondevice.release``, ``ondevice.prefetch`` and its
``cancel``, and pauses.  Five small modules share two fake GPUs that fit three units of them each (``SIZES``), so
memory binds.  Programs run

- on one thread, or in one asyncio task through ``async with``, where a model of the residency table says exactly
  what each step must do: what fits, what is evicted (kept and prefetched modules no scope holds, least recently
  used first), what a budget makes resident, which error is raised; and
- on 2-4 threads and asyncio tasks at once, where an error is allowed only where the program's text says it may
  happen (:func:`why_not_allowed`).

After every step and inside every block: no device above its capacity (the fake GPU's peak counters), the table and
the tensors agree (a module held wholly on its device, or with a budget at most its budget there; one not held
wholly on the CPU: none on two devices, none half loaded after an error), a module held by a live scope is on that
scope's device and computes there what it computes on the CPU.  At the end, keeps released and prefetches
cancelled: everything on the CPU, device memory back to its baseline on both devices, nothing held, nobody waiting;
every thread ends within its timeout (a thread still running is a deadlock).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, NamedTuple, Union

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

import ondevice
from ondevice import OutOfDeviceMemory, ResidencyConflictError, on_gpu
from ondevice.residency import Claim, Holding, State, moves, table
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU, fake_gpu

CPU = torch.device("cpu")
UNIT = 64 * 64 * 4  # bytes of a Linear(64, 64) without bias
UNITS = {"a": (1,), "b": (1,), "c": (2,), "d": (1, 1), "e": (1,)}  # each submodule that owns weights, in units
SIZES = {name: sum(units) for name, units in UNITS.items()}  # "d" is two Linear(64, 64): it streams layer by layer
NAMES = tuple(SIZES)
CAPACITY = 3 * UNIT + UNIT // 2  # per device: three units of modules, and room for the forwards' activations
ACTIVATIONS = UNIT // 2
LONG = 15.0  # a timeout no wait of these millisecond programs reaches: reaching it means the wait hung
JOIN_S = 120.0  # a program's threads all end within this, or it deadlocked
EXAMPLES = int(os.environ.get("ONDEVICE_PROPERTY_EXAMPLES", "500"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same programs on every run and every machine: CI is reproducible
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    report_multiple_bugs=False,  # one shrunk program at a time: a failing run ends sooner
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- programs


class _Readable:
    """Hypothesis prints a failing program with ``repr``, as the steps read."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # noqa: FBT001  (IPython's protocol)
        printer.text(repr(self))


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(names)


@dataclass(frozen=True, repr=False)
class Scope(_Readable):
    """``with on_gpu(*names, device=, ...):`` the body's steps, then ``raise Boom`` if ``fail``."""

    names: tuple[str, ...]
    device: int
    keep: bool = False
    wait: bool = False
    timeout: float | None = None
    budget: int | None = None
    prefetch: tuple[str, ...] = ()
    fail: bool = False
    body: tuple[Step, ...] = ()

    def __repr__(self) -> str:
        options = [f"device={self.device}"]
        options += [f"{k}=True" for k, v in (("keep", self.keep), ("wait", self.wait)) if v]
        options += [f"{k}={v!r}" for k, v in (("timeout", self.timeout), ("budget", self.budget)) if v is not None]
        options += [f"prefetch=({_listed(self.prefetch)})"] if self.prefetch else []
        body = [*map(repr, self.body), *(["raise Boom"] if self.fail else [])]
        return f"on_gpu({_listed(self.names)}, {', '.join(options)}): [{'; '.join(body)}]"


@dataclass(frozen=True, repr=False)
class Keep(_Readable):
    """``ondevice.keep(*names, device=device)``."""

    names: tuple[str, ...]
    device: int

    def __repr__(self) -> str:
        return f"keep({_listed(self.names)}, device={self.device})"


@dataclass(frozen=True, repr=False)
class Release(_Readable):
    """``ondevice.release(*names)``."""

    names: tuple[str, ...]

    def __repr__(self) -> str:
        return f"release({_listed(self.names)})"


@dataclass(frozen=True, repr=False)
class Prefetch(_Readable):
    """``ondevice.prefetch(*names, device=device)``; its handle is cancelled by a later ``cancel()`` or at the end."""

    names: tuple[str, ...]
    device: int

    def __repr__(self) -> str:
        return f"prefetch({_listed(self.names)}, device={self.device})"


@dataclass(frozen=True, repr=False)
class Cancel(_Readable):
    """``.cancel()`` of the oldest prefetch handle (of the program) not cancelled yet; none: nothing."""

    def __repr__(self) -> str:
        return "cancel()"


@dataclass(frozen=True, repr=False)
class Pause(_Readable):
    """Let other threads and tasks run (a short sleep; ``await asyncio.sleep(0)`` in a task)."""

    def __repr__(self) -> str:
        return "pause()"


Step = Union[Scope, Keep, Release, Prefetch, Cancel, Pause]  # noqa: UP007  (a runtime alias: Python 3.10)


def _block(steps: tuple[Step, ...]) -> str:
    return "[" + "; ".join(map(repr, steps)) + "]"


@dataclass(frozen=True, repr=False)
class Serial(_Readable):
    """One program, run on the test's thread, or (``in_task``) in one asyncio task through ``async with``."""

    steps: tuple[Step, ...]
    in_task: bool = False

    def __repr__(self) -> str:
        return f"{'in one asyncio task' if self.in_task else 'on one thread'}: {_block(self.steps)}"


@dataclass(frozen=True, repr=False)
class Concurrent(_Readable):
    """Programs run at once: each of ``threads`` on a thread, each of ``tasks`` as an asyncio task of one event loop
    (on a thread of its own)."""

    threads: tuple[tuple[Step, ...], ...]
    tasks: tuple[tuple[Step, ...], ...] = ()

    def __repr__(self) -> str:
        lines = [f"thread {i}: {_block(s)}" for i, s in enumerate(self.threads)]
        lines += [f"task {i}: {_block(s)}" for i, s in enumerate(self.tasks)]
        return "\n".join(lines)


def walk(steps: tuple[Step, ...], depth: int = 0) -> Iterator[tuple[Step, int]]:
    """Every step, with the number of scopes around it."""
    for step in steps:
        yield step, depth
        if isinstance(step, Scope):
            yield from walk(step.body, depth + 1)


# --------------------------------------------------------------------------- strategies

_RARELY = st.sampled_from([False, False, False, True])  # shrinks to False
_DEVICE = st.integers(0, 1)
_BUDGETS = st.sampled_from([None, None, None, None, UNIT, 2 * UNIT, UNIT // 2, 4 * UNIT])


def _names(most: int) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(NAMES), min_size=1, max_size=most, unique=True).map(tuple)


@st.composite
def _scope(draw: st.DrawFn, body: st.SearchStrategy[tuple[Step, ...]], timeouts: list[float]) -> Scope:
    names, device, wait, budget = draw(_names(3)), draw(_DEVICE), draw(st.booleans()), draw(_BUDGETS)
    return Scope(
        names,
        device,
        keep=draw(_RARELY),
        wait=wait,
        timeout=draw(st.sampled_from(timeouts)) if wait else None,
        budget=budget,
        # with a budget the room left for a prefetch depends on how the modules split: not modelled
        prefetch=draw(_names(2)) if budget is None and draw(_RARELY) else (),
        fail=draw(_RARELY),
        body=draw(body),
    )


def steps(depth: int, most: int, timeouts: list[float]) -> st.SearchStrategy[tuple[Step, ...]]:
    """Up to ``most`` steps (in a block: up to 3), scopes nested up to ``depth`` deep."""
    leaf = st.one_of(
        st.builds(Keep, _names(2), _DEVICE),
        st.builds(Release, _names(2)),
        st.builds(Prefetch, _names(2), _DEVICE),
        st.just(Cancel()),
        st.just(Pause()),
    )
    step = leaf if depth == 0 else st.one_of(_scope(steps(depth - 1, 3, timeouts), timeouts), leaf)
    return st.lists(step, max_size=most).map(tuple)


SERIAL_TIMEOUTS = [10.0, 0.0]  # on one thread a wait could never end: it must raise at once, never wait this out
CONCURRENT_TIMEOUTS = [LONG, 0.0, 0.01]

serial_programs = st.builds(Serial, steps(3, 6, SERIAL_TIMEOUTS), st.booleans())


@st.composite
def concurrent_programs(draw: st.DrawFn) -> Concurrent:
    program = steps(2, 4, CONCURRENT_TIMEOUTS)
    threads = draw(st.lists(program, min_size=1, max_size=3))
    tasks = draw(st.lists(program, min_size=max(0, 2 - len(threads)), max_size=4 - len(threads)))
    return Concurrent(tuple(threads), tuple(tasks))


# --------------------------------------------------------------------------- the rig: modules, references, checks


class Boom(Exception):  # noqa: N818  (the programs read "raise Boom")
    """Raised inside a block by a program (``fail=True``) and caught outside it."""


EXPECTED = (OutOfDeviceMemory, ResidencyConflictError)  # the errors a step may meet (when: the model, or the rules)


def resident_within(name: str, budget: int) -> int:
    """Bytes of module ``name`` the streamed path leaves on the device within ``budget``: its units in order, each
    that still fits (the table counts a holding loaded within a budget by these, not by the budget)."""
    used = 0
    for size in (units * UNIT for units in UNITS[name]):
        if used + size <= budget:
            used += size
    return used


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(ord(name))
    if name == "c":
        return torch.nn.Linear(64, 128, bias=False)
    if name == "d":
        return torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    return torch.nn.Linear(64, 64, bias=False)


def gpu(index: int) -> torch.device:
    return torch.device("fakegpu", index)


def on_device(module: torch.nn.Module, device: torch.device) -> int:
    return ondevice.placement(module).get(device, 0)


class Rig:
    """One example's modules on two fake GPUs, each one's forward computed on the CPU, and the prefetch handles."""

    def __init__(self, handle: FakeGPU) -> None:
        self.gpu = handle
        self.modules = {name: build(name) for name in NAMES}
        self.x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            self.want = {name: module(self.x) for name, module in self.modules.items()}
        self.forwards = {name: threading.Lock() for name in NAMES}  # a streamed module runs one forward at a time
        self.handles: list[ondevice.Prefetch] = []
        self.cancelled = 0  # handles[:cancelled] are cancelled
        self.seen: set[str] = set()  # what the program ran into, for --hypothesis-show-statistics
        self.lock = threading.Lock()

    def components(self, names: tuple[str, ...]) -> list[torch.nn.Module]:
        return [self.modules[name] for name in names]

    def check_consistent(self) -> dict[str, Holding]:
        """Under the table's lock (no move starts meanwhile): the table and the tensors agree, no module is on two
        devices, none is above its budget, no device above its capacity.  The holdings, by module name."""
        with table.lock:
            held = {name: table._held.get(id(module)) for name, module in self.modules.items()}
            for name, module in self.modules.items():
                where, holding = ondevice.placement(module), held[name]
                gpus = set(where) - {CPU}
                assert len(gpus) <= 1, f"{name} is on two devices: {where}"
                if holding is None:
                    assert set(where) == {CPU}, f"{name} is held by nothing, but is on {where}"
                elif holding.state is not State.RESIDENT or holding.partial:  # moving, or streamed
                    assert gpus <= {holding.device}, f"{name} is held on {holding.device}, but is on {where}"
                else:
                    assert set(where) == {holding.device}, f"{name} is held on {holding.device}, but is on {where}"
                if holding is not None and holding.state is State.RESIDENT:
                    resident = where.get(holding.device, 0)
                    assert resident <= holding.nbytes, f"{name}: {resident} bytes on the device, {holding} counts less"
            for index in (0, 1):
                assert self.gpu.max_memory_allocated(index) <= CAPACITY, f"fakegpu:{index} went above its capacity"
        return {name: h for name, h in held.items() if h is not None}

    def check_held(self, names: tuple[str, ...], device: int, *, forward: bool, streamed: bool = False) -> None:
        """A live scope holds ``names`` on ``device``: each is there (wholly, or within its budget), and (``forward``)
        computes there what it computes on the CPU; a module loaded within a budget computes only with ``streamed``
        (its forward streams in memory that the table does not count)."""
        for name in names:
            module = self.modules[name]
            with table.lock:
                holding = table._held.get(id(module))
                assert holding is not None and holding.claims and holding.device == gpu(device), f"{name} not held"
                partial, where = holding.partial, ondevice.placement(module)
            if not partial:
                assert set(where) == {gpu(device)}, f"{name} is held on fakegpu:{device}, but is on {where}"
            if forward and (streamed or not partial):
                with self.forwards[name], torch.inference_mode():
                    out = module(self.x.to(gpu(device))).cpu()
                assert torch.equal(out, self.want[name]), f"{name} computes wrong results on fakegpu:{device}"

    def note(self, what: str) -> None:
        with self.lock:
            self.seen.add(what)

    def add_handle(self, handle: ondevice.Prefetch) -> int:
        with self.lock:
            self.handles.append(handle)
            return len(self.handles) - 1

    def next_to_cancel(self) -> tuple[int, ondevice.Prefetch] | None:
        with self.lock:
            if self.cancelled == len(self.handles):
                return None
            self.cancelled += 1
            return self.cancelled - 1, self.handles[self.cancelled - 1]

    def finish(self) -> None:
        """Cancel every prefetch, release every keep: all on the CPU, device memory at its baseline, nothing held."""
        while (found := self.next_to_cancel()) is not None:
            found[1].cancel()
        ondevice.release(*self.modules.values())
        assert self.check_consistent() == {}, "something is still held"
        assert table.held() == [] and table.waiting() == []
        assert table._pending == {} and table._rooms == {}
        for index in (0, 1):
            assert self.gpu.memory_allocated(index) == 0, f"fakegpu:{index} is not back to its baseline"


@dataclass
class Entry:
    """A scope being entered: the step, when, and (serial programs) what the model says it must do."""

    step: Scope
    started: float
    error: type[Exception] | None = None
    before: dict[str, Slot] = field(default_factory=dict)
    after: dict[str, Slot] = field(default_factory=dict)


class Interpreter:
    """Runs steps, sync or in an asyncio task; subclasses check what each does (the hooks at the end)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    def on_gpu(self, step: Scope) -> on_gpu:
        options: dict[str, Any] = {"device": gpu(step.device), "keep": step.keep, "wait": step.wait}
        options.update(timeout=step.timeout, budget=step.budget)
        if step.prefetch:
            options["prefetch"] = self.rig.components(step.prefetch)
        return on_gpu(*self.rig.components(step.names), **options)

    def run(self, program: tuple[Step, ...]) -> None:
        for step in program:
            self.check()
            if isinstance(step, Scope):
                self.scope(step)
            elif isinstance(step, Pause):
                time.sleep(0.0005)
            else:
                self.leaf(step)
        self.check()

    def scope(self, step: Scope) -> None:
        entry = self.before(step)
        entered = False
        try:
            with self.on_gpu(step) as handle:
                entered = True
                self.entered(entry, handle)
                self.run(step.body)
                self.leaving(entry)
                if step.fail:
                    raise Boom
        except Boom:
            pass
        except EXPECTED as exc:
            if entered:
                raise  # from the exit: an exit never raises these
            self.refused(entry, exc)
            return
        self.exited(entry)

    async def arun(self, program: tuple[Step, ...]) -> None:
        for step in program:
            self.check()
            if isinstance(step, Scope):
                await self.ascope(step)
            elif isinstance(step, Pause):
                await asyncio.sleep(0)
            else:
                self.leaf(step)
        self.check()

    async def ascope(self, step: Scope) -> None:
        entry = self.before(step)
        entered = False
        try:
            async with self.on_gpu(step) as handle:
                entered = True
                self.entered(entry, handle)
                await self.arun(step.body)
                self.leaving(entry)
                if step.fail:
                    raise Boom
        except Boom:
            pass
        except EXPECTED as exc:
            if entered:
                raise
            self.refused(entry, exc)
            return
        self.exited(entry)

    def leaf(self, step: Step) -> None:
        if isinstance(step, Keep):
            self.keep(step)
        elif isinstance(step, Release):
            self.release(step)
        elif isinstance(step, Prefetch):
            self.prefetch(step)
        elif isinstance(step, Cancel):
            self.cancel()

    # ---- hooks

    def check(self) -> None:
        raise NotImplementedError

    def before(self, step: Scope) -> Entry:
        return Entry(step, time.monotonic())

    def entered(self, entry: Entry, handle: ondevice.ScopeHandle) -> None:
        raise NotImplementedError

    def leaving(self, entry: Entry) -> None:
        raise NotImplementedError

    def refused(self, entry: Entry, exc: Exception) -> None:
        raise NotImplementedError

    def exited(self, entry: Entry) -> None:
        raise NotImplementedError

    def keep(self, step: Keep) -> None:
        raise NotImplementedError

    def release(self, step: Release) -> None:
        raise NotImplementedError

    def prefetch(self, step: Prefetch) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- one thread: a model of the table


@dataclass(frozen=True)
class Slot:
    """What the model says of one module: where it is, who holds it, what the table counts for it."""

    device: int | None = None  # None: on the CPU, held by nothing
    claims: int = 0
    kept: bool = False
    prefetched: int | None = None  # the prefetch handle (by index) that put it there, until a scope claims it
    nbytes: int = 0  # what the table counts for it on the device
    partial: bool = False  # loaded within a budget smaller than it: the rest streamed per forward

    def seen(self) -> tuple[object, ...]:
        return self.device, self.claims, self.kept, self.prefetched is not None, self.nbytes, self.partial


ON_CPU = Slot()


class Plan(NamedTuple):
    """What a step must do: the error it raises (None: none), the slots after it, the bytes then on the device."""

    error: type[Exception] | None
    slots: dict[str, Slot]
    taken: int = 0


class Model(Interpreter):
    """Runs a serial program and checks each step against what the table must do (see the module docstring)."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig)
        self.slots = dict.fromkeys(NAMES, ON_CPU)

    # ---- what must happen

    def allocated(self, device: int) -> int:
        return self.rig.gpu.memory_allocated(device)

    def plan_acquire(
        self, names: tuple[str, ...], device: int, *, budget: int | None = None, keep: bool = False
    ) -> Plan:
        """What an acquire of ``names`` on ``device`` must do."""
        before, slots = self.slots, dict(self.slots)
        if any(slots[n].claims and slots[n].device != device for n in names):
            return Plan(ResidencyConflictError, slots)  # claimed by a live scope on the other device: nothing moves
        away = [n for n in names if slots[n].device not in (None, device)]
        for name in away:  # kept or prefetched on the other device: taken off first
            slots[name] = ON_CPU
        counted, left = {}, budget
        for name in (n for n in names if slots[n].device is None):  # whole while they fit the budget, then partly
            size = SIZES[name] * UNIT
            counted[name] = size if left is None or size <= left else left
            left = None if left is None else left - counted[name]
        needed = sum(counted.values())
        if needed > CAPACITY:
            return Plan(OutOfDeviceMemory, slots)
        free = CAPACITY - self.allocated(device)
        evicted = self.victims(slots, names, device, needed - free)
        if evicted is None:
            return Plan(OutOfDeviceMemory, slots)  # it does not fit; a wait on one thread could never end: it raises
        for name in evicted:
            slots[name] = ON_CPU
        if evicted:
            event("evicted")
        for name in names:
            was = before[name]
            slot = replace(was, device=device, claims=was.claims + 1, kept=was.kept or keep, prefetched=None)
            if name in counted:
                partial = counted[name] < SIZES[name] * UNIT
                slot = replace(slot, nbytes=resident_within(name, counted[name]) if partial else counted[name])
                slot = replace(slot, partial=partial)
                if partial:
                    event("loaded within a budget")
            slots[name] = slot
        taken = self.allocated(device) - sum(on_device(self.rig.modules[n], gpu(device)) for n in evicted) + needed
        return Plan(None, slots, taken)

    def victims(self, slots: dict[str, Slot], names: tuple[str, ...], device: int, shortfall: int) -> list[str] | None:
        """Kept and prefetched modules no scope holds, least recently used first, until ``shortfall`` bytes are free
        (counting what the table counts for them, as it does); None where all of them are not enough."""
        if shortfall <= 0:
            return []
        used = {name: holding.used for name, holding in self.rig.check_consistent().items()}
        idle = [
            n
            for n, s in slots.items()
            if s.device == device and not s.claims and (s.kept or s.prefetched is not None) and n not in names
        ]
        picked, freed = [], 0
        for name in sorted(idle, key=used.__getitem__):
            if freed >= shortfall:
                break
            picked.append(name)
            freed += slots[name].nbytes
        return None if freed < shortfall else picked

    def plan_prefetch(
        self, slots: dict[str, Slot], names: tuple[str, ...], device: int, handle: int, taken: int
    ) -> Plan:
        """What a prefetch must do, with ``taken`` bytes in use on the device: start what is on the CPU and fits there
        (never evicting); where a module is held on the other device, raise and start nothing."""
        after = dict(slots)
        for name in names:
            if after[name].device is not None:
                if after[name].device != device:
                    return Plan(ResidencyConflictError, slots)
                continue
            size = SIZES[name] * UNIT
            if size <= CAPACITY - taken:
                after[name] = Slot(device, prefetched=handle, nbytes=size)
                taken += size
        return Plan(None, after, taken)

    # ---- checks

    def check(self) -> None:
        held = self.rig.check_consistent()
        seen = {name: ON_CPU.seen() for name in NAMES}
        for name, h in held.items():
            assert h.state is State.RESIDENT, f"{name} is still moving after a step"
            seen[name] = (h.device.index, len(h.claims), h.kept, h.prefetched, h.nbytes, h.partial)
        assert seen == {name: slot.seen() for name, slot in self.slots.items()}, "the table is not what the model says"
        for index in (0, 1):  # nothing on a device but the modules: no activation, no copy left behind
            modules = sum(on_device(m, gpu(index)) for m in self.rig.modules.values())
            assert self.allocated(index) == modules, f"fakegpu:{index} holds other bytes than its modules'"
        for name, slot in self.slots.items():
            if slot.claims:
                assert slot.device is not None
                self.rig.check_held((name,), slot.device, forward=self.room_to_run(name, slot.device), streamed=True)

    def room_to_run(self, name: str, device: int) -> bool:
        """Whether a forward fits: the part of ``name`` streamed in for it, and the activations."""
        streamed = SIZES[name] * UNIT - on_device(self.rig.modules[name], gpu(device))
        return streamed + ACTIVATIONS <= CAPACITY - self.allocated(device)

    def outcome(self, error: type[Exception] | None, exc: BaseException | None, started: float) -> None:
        """The step raised ``exc`` (or nothing) where the model says ``error``."""
        event(f"raised {type(exc).__name__}" if exc is not None else "succeeded")
        if error is None:
            assert exc is None, f"raised {exc!r}, where the model says it succeeds"
            return
        assert isinstance(exc, error), f"the model says {error.__name__}, got {exc!r}"
        if isinstance(exc, OutOfDeviceMemory):
            assert "within timeout" not in str(exc), f"on one thread a wait could never end: raise at once ({exc})"
            assert time.monotonic() - started < SERIAL_TIMEOUTS[0], "it waited out its timeout before raising"

    def take(self, names: tuple[str, ...], before: dict[str, Slot], after: dict[str, Slot]) -> None:
        """After a refused step: the modules it did not name as planned; each it named as it was or on the CPU."""
        held = self.rig.check_consistent()
        for name in NAMES:
            if name not in names:
                self.slots[name] = after[name]
                continue
            h = held.get(name)
            seen = (h.device.index, len(h.claims), h.kept, h.prefetched, h.nbytes, h.partial) if h else ON_CPU.seen()
            assert seen in (before[name].seen(), ON_CPU.seen()), f"{name} is left changed by a refused step: {seen}"
            self.slots[name] = before[name] if seen == before[name].seen() else ON_CPU
        self.check()

    # ---- scopes

    def before(self, step: Scope) -> Entry:
        ahead = [n for n in step.prefetch if n not in step.names]
        if any(self.slots[n].device not in (None, step.device) for n in ahead):  # refused before anything moves
            return Entry(step, time.monotonic(), ResidencyConflictError, dict(self.slots), dict(self.slots))
        plan = self.plan_acquire(step.names, step.device, budget=step.budget, keep=step.keep)
        if plan.error is None and step.prefetch:  # no budget with it: the modules loaded whole take what they count
            plan = self.plan_prefetch(plan.slots, step.prefetch, step.device, len(self.rig.handles), plan.taken)
        return Entry(step, time.monotonic(), plan.error, dict(self.slots), plan.slots)

    def entered(self, entry: Entry, handle: ondevice.ScopeHandle) -> None:
        self.outcome(entry.error, None, entry.started)
        if handle.prefetched is not None:
            self.rig.add_handle(handle.prefetched)
        self.slots = entry.after
        self.check()

    def leaving(self, entry: Entry) -> None:
        self.check()

    def refused(self, entry: Entry, exc: Exception) -> None:
        self.outcome(entry.error, exc, entry.started)
        self.take(entry.step.names, entry.before, entry.after)

    def exited(self, entry: Entry) -> None:
        for name in entry.step.names:
            left = replace(self.slots[name], claims=self.slots[name].claims - 1)
            self.slots[name] = left if left.claims or left.kept else ON_CPU  # the last claim offloads, unless kept
        self.check()

    # ---- leaves

    def keep(self, step: Keep) -> None:
        before = dict(self.slots)
        error, after, _ = self.plan_acquire(step.names, step.device, keep=True)
        started = time.monotonic()
        try:
            ondevice.keep(*self.rig.components(step.names), device=gpu(step.device))
        except EXPECTED as exc:
            self.outcome(error, exc, started)
            self.take(step.names, before, after)
            return
        self.outcome(error, None, started)
        self.slots = {n: replace(s, claims=s.claims - 1) if n in step.names else s for n, s in after.items()}

    def release(self, step: Release) -> None:
        ondevice.release(*self.rig.components(step.names))
        for name in step.names:
            slot = self.slots[name]
            if slot.kept:
                self.slots[name] = replace(slot, kept=False) if slot.claims else ON_CPU

    def prefetch(self, step: Prefetch) -> None:
        before = dict(self.slots)
        taken = self.allocated(step.device)
        error, after, _ = self.plan_prefetch(before, step.names, step.device, len(self.rig.handles), taken)
        started = time.monotonic()
        try:
            handle = ondevice.prefetch(*self.rig.components(step.names), device=gpu(step.device))
        except EXPECTED as exc:
            self.outcome(error, exc, started)
            self.take((), before, before)  # a refused prefetch starts nothing
            return
        self.outcome(error, None, started)
        self.rig.add_handle(handle)
        self.slots = after

    def cancel(self) -> None:
        found = self.rig.next_to_cancel()
        if found is not None:
            index, handle = found
            handle.cancel()
            self.slots = {n: ON_CPU if s.prefetched == index else s for n, s in self.slots.items()}


# --------------------------------------------------------------------------- threads and tasks: the invariants


@dataclass(frozen=True)
class Facts:
    """What a concurrent program may run into, read from its text."""

    used_on: dict[int, frozenset[str]]  # per device: every module some step names with that device
    nested_wait: bool  # some scope with wait=True is nested in another: waits may close a cycle

    @classmethod
    def of(cls, program: Concurrent) -> Facts:
        used: dict[int, set[str]] = {0: set(), 1: set()}
        nested_wait = False
        for steps_ in (*program.threads, *program.tasks):
            for step, depth in walk(steps_):
                if isinstance(step, Scope):
                    used[step.device].update(step.names, step.prefetch)
                    nested_wait |= step.wait and depth > 0
                elif isinstance(step, (Keep, Prefetch)):
                    used[step.device].update(step.names)
        return cls({d: frozenset(names) for d, names in used.items()}, nested_wait)


def why_not_allowed(  # noqa: PLR0911  (one return per rule of the docstring)
    step: Scope | Keep | Prefetch, exc: Exception, facts: Facts, elapsed: float
) -> str | None:
    """None where a concurrent program may make ``step`` raise ``exc``; else why it may not.

    - ``ResidencyConflictError``: some step names one of the modules (or those it prefetches) with the other device;
    - ``OutOfDeviceMemory``, "more than the device's whole memory": the modules are larger than a device;
      "wait=False": without wait=True, and the modules named there by any step do not all fit at once;
      "timeout": after waiting at least the (short) timeout; a wait of LONG seconds ends in time, always;
      "could never end": some scope that waits is nested in another (waits may close a cycle);
      a load that ran out of device memory all the same: never (the table counts every byte).
    """
    names, device = step.names, step.device
    if isinstance(exc, ResidencyConflictError):
        named = set(names) | set(step.prefetch if isinstance(step, Scope) else ())
        return None if named & facts.used_on[1 - device] else "no step names these modules on the other device"
    if not isinstance(exc, OutOfDeviceMemory) or isinstance(step, Prefetch):
        return "not an error this step may raise"
    message, wait = str(exc), isinstance(step, Scope) and step.wait
    if "whole memory" in message:
        return None if sum(SIZES[n] for n in names) * UNIT > CAPACITY else "they fit on an empty device"
    if "wait=False" in message:
        fits = sum(SIZES[n] for n in set(names) | facts.used_on[device]) * UNIT <= CAPACITY
        return None if not (wait or fits) else "every module named there fits at once"
    if "within timeout" in message:
        assert isinstance(step, Scope) and step.timeout is not None
        if step.timeout >= LONG:
            return f"it waited {step.timeout} s: a program of milliseconds hung"
        return None if elapsed >= step.timeout else f"it gave up after {elapsed:.3f} s, before its timeout"
    if "could never end" in message:
        return None if facts.nested_wait else "no scope that waits is nested in another: no wait closes a cycle"
    return "a load ran out of device memory, or another unexpected out-of-memory error"


class Worker(Interpreter):
    """Runs one thread's or task's program among others: checks the invariants, judges every error it meets."""

    def __init__(self, rig: Rig, facts: Facts, name: str, failures: list[str]) -> None:
        super().__init__(rig)
        self.facts, self.name, self.failures = facts, name, failures
        self.live: list[Scope] = []

    def check(self) -> None:
        self.rig.check_consistent()
        for step in self.live:
            self.rig.check_held(step.names, step.device, forward=False)

    def judge(self, step: Scope | Keep | Prefetch, exc: Exception, started: float) -> None:
        why = why_not_allowed(step, exc, self.facts, time.monotonic() - started)
        detail = f" ({str(exc).split('; ')[1][:30]})" if ";" in str(exc) else ""
        self.rig.note(f"raised {type(exc).__name__}{detail}")
        if why is not None:
            self.failures.append(f"{self.name}: {step!r} raised {exc!r}, which it may not: {why}")
        self.rig.check_consistent()  # nothing half loaded

    def entered(self, entry: Entry, handle: ondevice.ScopeHandle) -> None:
        self.rig.note(f"entered a scope{' that waits' if entry.step.wait else ''}")
        self.live.append(entry.step)
        if handle.prefetched is not None:
            self.rig.add_handle(handle.prefetched)
        self.rig.check_held(entry.step.names, entry.step.device, forward=True)

    def leaving(self, entry: Entry) -> None:
        self.rig.check_held(entry.step.names, entry.step.device, forward=False)

    def refused(self, entry: Entry, exc: Exception) -> None:
        self.judge(entry.step, exc, entry.started)

    def exited(self, entry: Entry) -> None:
        self.live.pop()

    def scope(self, step: Scope) -> None:
        depth = len(self.live)
        try:
            super().scope(step)
        finally:
            del self.live[depth:]

    async def ascope(self, step: Scope) -> None:
        depth = len(self.live)
        try:
            await super().ascope(step)
        finally:
            del self.live[depth:]

    def keep(self, step: Keep) -> None:
        started = time.monotonic()
        try:
            ondevice.keep(*self.rig.components(step.names), device=gpu(step.device))
        except EXPECTED as exc:
            self.judge(step, exc, started)

    def release(self, step: Release) -> None:
        ondevice.release(*self.rig.components(step.names))

    def prefetch(self, step: Prefetch) -> None:
        try:
            self.rig.add_handle(ondevice.prefetch(*self.rig.components(step.names), device=gpu(step.device)))
        except EXPECTED as exc:
            self.judge(step, exc, time.monotonic())

    def cancel(self) -> None:
        found = self.rig.next_to_cancel()
        if found is not None:
            found[1].cancel()

    def record(self) -> None:
        self.failures.append(f"{self.name}:\n{traceback.format_exc()}")


def run_concurrent(rig: Rig, program: Concurrent) -> list[str]:
    """Run every thread's and task's program at once; what failed (a thread running after JOIN_S: a deadlock)."""
    facts, failures = Facts.of(program), []
    threads = [Worker(rig, facts, f"thread {i}", failures) for i in range(len(program.threads))]
    tasks = [Worker(rig, facts, f"task {i}", failures) for i in range(len(program.tasks))]
    start = threading.Barrier(len(threads) + (1 if tasks else 0))

    def on_thread(worker: Worker, steps_: tuple[Step, ...]) -> None:
        start.wait(JOIN_S)
        try:
            worker.run(steps_)
        except BaseException:  # noqa: BLE001  (recorded: a thread's error does not reach pytest by itself)
            worker.record()

    async def in_task(worker: Worker, steps_: tuple[Step, ...]) -> None:
        try:
            await worker.arun(steps_)
        except BaseException:  # noqa: BLE001  (recorded)
            worker.record()

    async def gather() -> None:
        await asyncio.gather(*(in_task(w, s) for w, s in zip(tasks, program.tasks, strict=True)))

    def event_loop() -> None:
        start.wait(JOIN_S)
        asyncio.run(gather())

    runs: list[Callable[[], None]] = [
        (lambda w=w, s=s: on_thread(w, s)) for w, s in zip(threads, program.threads, strict=True)
    ]
    if tasks:
        runs.append(event_loop)
    running = [threading.Thread(target=run, daemon=True) for run in runs]
    for thread in running:
        thread.start()
    deadline = time.monotonic() + JOIN_S
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in running):
        failures.append(f"threads still running after {JOIN_S} s (a deadlock); waiting: {table.waiting()}")
    return failures


# --------------------------------------------------------------------------- the properties


@contextmanager
def two_small_gpus() -> Iterator[Rig]:
    """Two fake GPUs of CAPACITY bytes, fresh modules; whatever a failed example left held is let go."""
    with fake_gpu(CAPACITY, device_count=2) as handle:
        for index in (0, 1):
            handle.reset_peak_memory_stats(index)
        try:
            yield Rig(handle)
        finally:
            _let_go()


def _let_go() -> None:
    leaked = table.held()
    table.release([Claim(holding, part) for holding in leaked for part in list(holding.claims)])
    for holding in leaked:
        if holding.prefetched:
            table.cancel(holding)
    table.end_keep([holding.part for holding in leaked if holding.kept])


@SETTINGS
@given(serial_programs)
@example(  # found at 3,000 programs: the prefetch's conflict is raised before the acquire's memory check
    Serial((Scope(("a",), 0), Scope(("b",), 1, body=(Scope(("a", "c", "d"), 0, prefetch=("b",)),))))
)
def test_one_thread_does_what_the_model_of_the_table_says(program: Serial) -> None:
    """On one thread (or in one asyncio task) each step fits, evicts, raises and leaves the modules exactly as the
    model says; the invariants hold after every step; all ends on the CPU, device memory at its baseline."""
    with two_small_gpus() as rig:
        model = Model(rig)
        if program.in_task:
            asyncio.run(model.arun(program.steps))
        else:
            model.run(program.steps)
        rig.finish()


@SETTINGS
@given(concurrent_programs())
def test_threads_and_tasks_keep_the_invariants(program: Concurrent) -> None:
    """On 2-4 threads and asyncio tasks at once: the invariants hold at every step, every error is one the program
    may run into and leaves nothing half loaded, every thread ends in time, all ends on the CPU."""
    with two_small_gpus() as rig:
        failures = run_concurrent(rig, program)
        assert not failures, "\n\n".join(failures)
        for what in sorted(rig.seen):
            event(what)
        rig.finish()


# --------------------------------------------------------------------------- regressions: what the properties found


def _where(module: torch.nn.Module) -> set[torch.device]:
    return set(ondevice.placement(module))


def test_a_refused_keep_true_entry_leaves_nothing_kept() -> None:
    """on_gpu(b, keep=True, prefetch=a) refused because a is held on the other device: b is not left kept."""
    a, b = build("a"), build("b")
    with two_small_gpus(), on_gpu(a, device=gpu(1)):
        with pytest.raises(ResidencyConflictError), on_gpu(b, device=gpu(0), keep=True, prefetch=a):
            pytest.fail("the block must not run")
        assert _where(b) == {CPU} and [h.key for h in table.held()] == [a]


def test_a_scope_larger_than_the_device_with_a_kept_part_raises_at_once() -> None:
    """keep(a), then on_gpu(a, b, c, wait=True): a, b and c never fit together, so it raises at once (it waited for
    its whole timeout, and with no timeout for ever)."""
    a, b, c = build("a"), build("b"), build("c")
    with two_small_gpus():
        ondevice.keep(a, device=gpu(0))
        started = time.monotonic()
        with pytest.raises(OutOfDeviceMemory) as info, on_gpu(a, b, c, device=gpu(0), wait=True, timeout=30):
            pytest.fail("the block must not run")
        assert "within timeout" not in str(info.value) and time.monotonic() - started < 30  # timeout=30
        assert _where(b) == _where(c) == {CPU}


class _SlowToLeave(torch.nn.Linear):
    """A module whose offload waits for ``go`` (so that another thread acts while it leaves the device)."""

    leaving = threading.Event()
    go = threading.Event()


class _SlowToLeavePart(ModulePart):
    def offload(self) -> None:
        _SlowToLeave.leaving.set()
        _SlowToLeave.go.wait(30)
        super().offload()


ondevice.register_strategy(_SlowToLeave, SimpleNamespace(parts=lambda c: [_SlowToLeavePart(c)]))


def test_a_prefetch_made_while_its_module_leaves_the_device_counts_its_bytes() -> None:
    """prefetch(m) while another thread's scope exit offloads m: the prefetch waits for it, then starts, and the table
    counts m's bytes for it (it counted 0, so later scopes overfilled the device)."""
    _SlowToLeave.leaving.clear()
    _SlowToLeave.go.clear()
    module = _SlowToLeave(64, 64, bias=False)
    started: list[ondevice.Prefetch] = []

    def scope_then_exit() -> None:
        with on_gpu(module, device=gpu(0)):
            pass

    with two_small_gpus():
        exiting = threading.Thread(target=scope_then_exit)
        exiting.start()
        assert _SlowToLeave.leaving.wait(30)
        prefetching = threading.Thread(target=lambda: started.append(ondevice.prefetch(module, device=gpu(0))))
        prefetching.start()
        deadline = time.monotonic() + 30
        while not table._sleepers and time.monotonic() < deadline:  # the prefetch waits for the offload to end
            time.sleep(0.001)
        _SlowToLeave.go.set()
        exiting.join(30)
        prefetching.join(30)
        try:
            (holding,) = table.held()
            assert holding.prefetched and _where(module) == {gpu(0)}
            assert holding.nbytes == UNIT
        finally:
            started[0].cancel()


def test_a_prefetch_survives_another_scope_taking_a_module_it_started() -> None:
    """prefetch(b, a, device=1) while a scope (here a move listener's) moves b to device 0 once its prefetch started:
    the prefetch returns (b was taken by the scope, as prefetched modules may be); it raised OnDeviceError."""
    a, b = build("a"), build("b")
    moved: list[bool] = []

    def take_b(event: ondevice.events.MoveEvent) -> None:
        if not moved and event.target == gpu(1):
            moved.append(True)
            with on_gpu(b, device=gpu(0)):
                pass

    with two_small_gpus():
        remove = ondevice.events.add_listener(take_b)
        try:
            handle = ondevice.prefetch(b, a, device=gpu(1))
        finally:
            remove()
        handle.cancel()
        assert moved and _where(a) == _where(b) == {CPU}


def test_a_budget_smaller_than_a_single_layer_module_is_kept() -> None:
    """on_gpu(a, b, budget=UNIT) with a and b one Linear(64, 64) each: at most the budget on the device, and the table
    counts every byte there (b went on whole, counted as 0 bytes; with c as well the load ran out of memory)."""
    a, b, c = build("a"), build("b"), build("c")
    with two_small_gpus() as rig, on_gpu(a, b, device=gpu(0), budget=UNIT):
        assert rig.gpu.memory_allocated(0) <= UNIT
        assert all(on_device(h.key, gpu(0)) <= h.nbytes for h in table.held())  # type: ignore[arg-type]
    with two_small_gpus(), on_gpu(a, b, c, device=gpu(0), budget=UNIT):
        pass


def test_a_prefetch_survives_a_scope_taking_its_module_while_it_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefetch(b, a, device=1) while another thread's scope moves b to device 0 between the prefetch's look at what
    it still holds and its check that those are on the device: the prefetch returns (it raised OnDeviceError)."""
    a, b = build("a"), build("b")
    check = moves.verify
    taken: list[bool] = []

    def another_thread_acts_first(holdings: list[Holding], device: torch.device) -> None:
        if not taken and not table._state._is_owned():  # outside the table's lock another thread may move b now
            taken.append(True)
            with on_gpu(b, device=gpu(0)):
                pass
        check(holdings, device)

    monkeypatch.setattr(moves, "verify", another_thread_acts_first)
    with two_small_gpus():
        ondevice.prefetch(b, a, device=gpu(1)).cancel()
        assert _where(a) == _where(b) == {CPU}


def test_a_wait_only_its_own_kept_part_could_end_raises_at_once() -> None:
    """keep(c); with on_gpu(a): on_gpu(e, c, wait=True): e fits only if c goes, which this scope itself asks for, and
    a is this thread's: the wait could never end, so it raises at once (it counted c as evictable and waited)."""
    a, c, e = build("a"), build("c"), build("e")
    with two_small_gpus():
        ondevice.keep(c, device=gpu(0))
        started = time.monotonic()
        with (
            on_gpu(a, device=gpu(0)),
            pytest.raises(OutOfDeviceMemory) as info,
            on_gpu(e, c, device=gpu(0), wait=True, timeout=30),
        ):
            pytest.fail("the block must not run")
        assert "within timeout" not in str(info.value) and time.monotonic() - started < 30  # timeout=30
        assert _where(e) == {CPU} and _where(c) == {gpu(0)}


def test_a_refused_entry_leaves_a_kept_module_on_its_device() -> None:
    """keep(a, b) on device 0, then on_gpu(a, device=1, prefetch=b), refused since b is held on device 0: a is left
    kept where it was, or offloaded, not moved to device 1 and kept there by a scope that never ran."""
    a, b = build("a"), build("b")
    with two_small_gpus():
        ondevice.keep(a, b, device=gpu(0))
        with pytest.raises(ResidencyConflictError), on_gpu(a, device=gpu(1), prefetch=b):
            pytest.fail("the block must not run")
        assert _where(a) in ({gpu(0)}, {CPU})
        ondevice.release(a, b)


def test_a_refused_scope_evicts_nothing_it_could_not_use() -> None:
    """c kept within a budget of one unit (streamed: nothing of it resident), a and b held: on_gpu(d) does not fit even
    with c gone, so it raises and c stays kept (the table counted c's budget as memory eviction would free)."""
    a, b, c, d = build("a"), build("b"), build("c"), build("d")
    with two_small_gpus():
        with on_gpu(c, device=gpu(0), keep=True, budget=UNIT):
            pass
        with on_gpu(a, b, device=gpu(0)), pytest.raises(OutOfDeviceMemory), on_gpu(d, device=gpu(0)):
            pytest.fail("the block must not run")
        assert [h.key for h in table.held()] == [c]
        ondevice.release(c)


def test_a_module_streamed_within_a_budget_takes_only_what_it_holds() -> None:
    """c kept within a budget of one unit (one layer of two units: nothing of it resident), then on_gpu(a, c, d): a and
    d fit beside it, so the scope enters (it raised "more than the device's whole memory", counting c's budget)."""
    a, c, d = build("a"), build("c"), build("d")
    with two_small_gpus() as rig:
        with on_gpu(c, device=gpu(0), keep=True, budget=UNIT):
            pass
        assert rig.gpu.memory_allocated(0) == 0
        with on_gpu(a, c, d, device=gpu(0)):
            assert _where(a) == _where(d) == {gpu(0)}
        ondevice.release(c)
