"""Measured forward time of denoisers on this device, and a per-unit latency table to budget pruning in time.

How time is measured (the machine is often shared, so wall-clock time is unreliable): on CPU, thread CPU time
(`time.thread_time`) of forwards run with ONE torch thread; on a GPU, CUDA events. Every model is warmed up
first. Several models are compared side by side: repeats are interleaved (A B C, B C A, C A B, ...: the order
rotates) and a ratio is the median of the per-repeat ratios, so load that changes during a run cancels out.

The latency table holds, for each unit of a pruning decision space and each of its reachable levels (a width
ratio, or 1.0 for a removed layer), the change of the base's forward time at a batch size. A decision's time
is estimated as base time + the sum of its units' changes (interpolated between measured levels); the final
pruned model is then timed directly, since the changes are not exactly additive. A table is measured once per
(architecture, sample shape, device, batch, torch version) and cached as JSON.

A counted clock: with the environment variable TDCDIFF_CLOCK=flops, forward time is counted, not measured: a
forward at batch B "takes" flops.count_flops x B / COUNTED_FLOPS_PER_SECOND seconds, so every time, ratio and
latency table of this module is the same on any machine, idle or busy (the tests use it: a time budget's outcome
must not depend on the machine). Its tables are cached apart from measured ones. It does not touch
evaluate.time_sampling, which reports measured sampling time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache_home import cache_home, cached_entry, discard, entry_json
from .files import atomic_write_text
from .flops import count_flops
from .models import as_denoiser
from .settings import is_real

TABLE_VERSION = 1
# A forward at least this long (big models at large batches: the DDPM CIFAR-10 UNet takes ~13 CPU-s at batch 64) is
# warmed up once and timed in at most LONG_FORWARD_REPEATS rounds: the first call pays the allocations, and the
# timer's resolution and jitter are far below 1% of it.
LONG_FORWARD_SECONDS = 1.0
LONG_FORWARD_REPEATS = 3
# FLOPs of one timed CPU forward above which a FLOPs-budgeted expert is timed at a smaller batch (timing_batch):
# about 2 CPU-s here; the DDPM CIFAR-10 UNet (12.4 GFLOPs) is timed at batch 16 instead of 64.
TIMING_FLOPS = 2e11
CLOCK_VARIABLE = "TDCDIFF_CLOCK"
CLOCKS = ("measured", "flops")
COUNTED_FLOPS_PER_SECOND = 1e9  # nominal: budgets and ratios are fractions, so only FLOPs ratios matter
# No denoiser's forward is shorter (a torch module call alone takes microseconds; counted, 100 FLOPs): a cached base
# time below it is damage, which would make every ratio against it huge.
MIN_FORWARD_SECONDS = 1e-7
MAX_TABLE_BYTES = 16 << 20  # a table is about 40 bytes per unit and level: a few kB for the DDPM CIFAR-10 UNet


def clock() -> str:
    """Where forward times come from: "measured" (unset $TDCDIFF_CLOCK: see the module doc) or "flops" (counted).

    Raises ValueError naming the variable for any other value.
    """
    name = os.environ.get(CLOCK_VARIABLE) or "measured"
    if name not in CLOCKS:
        raise ValueError(f"{CLOCK_VARIABLE}={name!r} is not a clock; set it to 'flops' (forward time counted from "
                         "FLOPs, the same on any machine) or unset it (measured time)")
    return name


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def device_name(device: torch.device | str) -> str:
    """A stable name of the device that times are measured on, e.g. "cpu:Intel(R) Xeon(R) ..." or "cuda:NVIDIA H200"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu:{line.split(':', 1)[1].strip()}"
    return f"cpu:{platform.processor() or platform.machine()}"


def architecture_hash(model: nn.Module, sample_shape: Sequence[int]) -> str:
    """Hex digest of what a forward's time depends on: module types, parameter/buffer shapes, sample shape."""
    parts = [list(sample_shape)]
    for name, m in as_denoiser(model).named_modules():
        shapes = [list(t.shape) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        parts.append([name, type(m).__qualname__, shapes])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _timed_on(device: torch.device | str) -> str:
    """The device name times are measured on, or the counted clock's name (its tables never mix with measured)."""
    return f"counted:{COUNTED_FLOPS_PER_SECOND:g} FLOPs/s" if clock() == "flops" else device_name(device)


def cache_key(model: nn.Module, sample_shape: Sequence[int], batch: int, device: torch.device | str) -> str:
    """The cache key of a latency table: architecture hash + device name (or the counted clock) + batch + torch
    version."""
    arch = architecture_hash(model, sample_shape)
    raw = f"{arch}|{_timed_on(device)}|{batch}|{torch.__version__}"
    return f"{arch}-b{batch}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def default_cache_dir() -> Path:
    """$TDCDIFF_CACHE/latency, else $XDG_CACHE_HOME/tdcdiff/latency, else ~/.cache/tdcdiff/latency. Raises
    ValueError naming TDCDIFF_CACHE when it cannot be a writable folder (cache_home.cache_home)."""
    return cache_home() / "latency"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for the block. Timing: thread CPU time is then the whole forward's cost. Pruning and
    FLOPs trials (thousands of tiny ops): one thread is as fast, and immune to oversubscription (with another
    process busy on a 2-core machine, two threads were ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _timing_threads(device: torch.device) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if device.type == "cuda" else one_thread()


def _inputs(model: nn.Module, sample_shape: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    try:
        x = torch.randn((batch, *sample_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    except (RuntimeError, MemoryError) as err:  # torch's allocator failure (OutOfMemoryError is a RuntimeError)
        raise ValueError(f"not enough memory for a timing batch of {batch} samples of shape {tuple(sample_shape)} "
                         f"({type(err).__name__}); lower --latency-batch") from None
    return x, torch.full((batch,), 500, dtype=torch.long, device=device)


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """A function (run, calls) -> seconds per call of `run`: thread CPU time on CPU, CUDA events on a GPU."""
    if device.type == "cuda":

        def cuda(run, calls: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / calls

        return cuda

    def cpu(run, calls: int) -> float:
        start = time.thread_time()
        for _ in range(calls):
            run()
        return (time.thread_time() - start) / calls

    return cpu


@torch.no_grad()
def compare(
    models: Sequence[nn.Module],
    sample_shape: Sequence[int],
    batch: int,
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.02,
) -> list[list[float]]:
    """Time one forward of each model side by side: seconds per forward, one list per model, one item per repeat.

    models: denoisers called as model(x, t), all on the same device (moved nowhere; put in eval mode).
    sample_shape: (C, H, W) of one sample. batch: samples per forward.
    repeats: interleaved rounds; round r times the models in the order rotated by r. warmup: untimed forwards
        of each model first. min_seconds: each timing repeats the forward enough times to last about this long
        (calibrated on the first model's last warm-up forward), so that short forwards are not lost in timer
        resolution. A model whose first warm-up forward takes LONG_FORWARD_SECONDS or more is warmed up once, and
        when the first model's forward is that long, at most LONG_FORWARD_REPEATS rounds are timed.
    With $TDCDIFF_CLOCK=flops the times are counted instead (see the module doc): no forward runs.
    Raises ValueError for an empty list, batch < 1, repeats < 1 or an unknown $TDCDIFF_CLOCK.
    """
    if not models:
        raise ValueError("compare() needs at least one model")
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be >= 1, got batch={batch}, repeats={repeats}")
    denoisers = [as_denoiser(m).eval() for m in models]
    if clock() == "flops":
        return [[count_flops(d, sample_shape) * batch / COUNTED_FLOPS_PER_SECOND] * repeats for d in denoisers]
    device = device_of(denoisers[0])
    timer = _timer(device)
    runs = []
    for d in denoisers:
        x, t = _inputs(d, sample_shape, batch)
        runs.append(lambda d=d, x=x, t=t: d(x, t))
    with _timing_threads(device):
        last = [_warm_up(run, warmup, timer) for run in runs]
        per_call = last[0] if last[0] is not None else timer(runs[0], 1)
        calls = max(1, math.ceil(min_seconds / max(per_call, 1e-6)))
        if per_call >= LONG_FORWARD_SECONDS:
            repeats = min(repeats, LONG_FORWARD_REPEATS)
        times: list[list[float]] = [[] for _ in runs]
        for r in range(repeats):
            for i in [(r + j) % len(runs) for j in range(len(runs))]:
                times[i].append(timer(runs[i], calls))
    return times


def _warm_up(run: Callable[[], object], warmup: int, timer) -> float | None:
    """`warmup` untimed calls of `run` (one when the first takes LONG_FORWARD_SECONDS or more); returns the
    seconds of the last one (None for no warm-up)."""
    took = None
    for _ in range(warmup):
        took = timer(run, 1)
        if took >= LONG_FORWARD_SECONDS:
            break
    return took


def forward_seconds(model: nn.Module, sample_shape: Sequence[int], batch: int, **kwargs) -> float:
    """Median seconds of one forward of one model at a batch size (kwargs: as for compare())."""
    return statistics.median(compare([model], sample_shape, batch, **kwargs)[0])


def time_ratios(models: Sequence[nn.Module], sample_shape: Sequence[int], batch: int, **kwargs) -> list[float]:
    """Each model's forward time as a fraction of the first model's: median of per-repeat ratios, measured
    side by side (kwargs: as for compare()). The first ratio is 1.0."""
    times = compare(models, sample_shape, batch, **kwargs)
    return [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]


@dataclass
class LatencyTable:
    """Forward-time changes of pruning single units of a base model, at one batch size on one device.

    key: cache_key() of the base. base_seconds: the base's median forward time.
    deltas: unit name -> {level: change of forward time in seconds}; level 0.0 (unpruned) is implicitly 0.
        Levels are width ratios (fraction of channels removed) or 1.0 for a removed layer.
    meta: device, batch, torch version, sample shape (for people reading the file).
    """

    key: str
    base_seconds: float
    deltas: dict[str, dict[float, float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def delta(self, unit: str, level: float) -> float:
        """Time change of one unit at a level, linear between measured levels (clamped at the ends).

        Raises KeyError naming the unit when the table has no entry for it.
        """
        if level <= 0.0:
            return 0.0
        if unit not in self.deltas:
            raise KeyError(f"the latency table has no entry for unit {unit!r}")
        points = sorted({0.0: 0.0, **self.deltas[unit]}.items())
        if level >= points[-1][0]:
            return points[-1][1]
        for (a, da), (b, db) in zip(points, points[1:]):
            if a <= level <= b:
                return da + (db - da) * (level - a) / (b - a)
        return points[-1][1]

    def estimate(self, decision: dict[str, float]) -> float:
        """Estimated forward seconds of the base pruned by a decision: base + the sum of per-unit changes."""
        return self.base_seconds + sum(self.delta(u, level) for u, level in decision.items() if level > 0)

    def to_json(self) -> str:
        deltas = {u: [[level, d] for level, d in sorted(v.items())] for u, v in self.deltas.items()}
        return json.dumps(
            {"version": TABLE_VERSION, "key": self.key, "base_seconds": self.base_seconds, "deltas": deltas,
             "meta": self.meta},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        """Rebuild a table written by to_json(). Raises ValueError "not a tdcdiff latency table (...)" for anything
        else: text that is not JSON, or a value table_problem refuses."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"not a tdcdiff latency table (not JSON: {err})") from None
        problem = table_problem(data)
        if problem:
            raise ValueError(f"not a tdcdiff latency table ({problem})")
        return cls._from_checked(data)

    @classmethod
    def _from_checked(cls, data: dict) -> "LatencyTable":
        """The table of parsed JSON that table_problem found nothing wrong with."""
        deltas = {u: {float(level): float(d) for level, d in items} for u, items in data["deltas"].items()}
        return cls(data["key"], float(data["base_seconds"]), deltas, dict(data.get("meta", {})))


def table_problem(data: object) -> str | None:
    """What is wrong with parsed JSON as a latency table of to_json()'s form, or None: each field of the right type,
    base_seconds a finite forward time >= MIN_FORWARD_SECONDS, every level a width ratio in (0, 1] and every
    change finite and above -base_seconds (no pruning takes the whole forward time)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if json.dumps(data.get("version")) != json.dumps(TABLE_VERSION):
        return f"version {data.get('version')!r}, expected {TABLE_VERSION}"
    base, deltas = data.get("base_seconds"), data.get("deltas")
    if not isinstance(data.get("key"), str):
        return f"key {data.get('key')!r} is not text"
    if not (is_real(base) and math.isfinite(base) and base >= MIN_FORWARD_SECONDS):
        return f"base_seconds {base!r} is not a forward time, a finite number of seconds >= {MIN_FORWARD_SECONDS:g}"
    if not isinstance(data.get("meta", {}), dict):
        return "meta is not an object"
    if not isinstance(deltas, dict):
        return "deltas is not an object"
    for unit, items in deltas.items():
        if not (isinstance(items, list) and all(isinstance(i, list) and len(i) == 2 for i in items)):
            return f"deltas of {unit!r} are not a list of [level, change] pairs"
        for level, change in items:
            if not (is_real(level) and 0 < level <= 1):
                return f"deltas of {unit!r}: level {level!r} is not a width ratio in (0, 1]"
            if not (is_real(change) and math.isfinite(change) and change > -base):
                return (f"deltas of {unit!r}: the change {change!r} at level {level!r} is not a finite number of "
                        f"seconds above -base_seconds ({base!r})")
    return None


def measure_table(
    base: nn.Module,
    variants: dict[str, dict[float, Callable[[], nn.Module]]],
    sample_shape: Sequence[int],
    batch: int,
    *,
    cache_dir: str | Path | None = None,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """The latency table of a base model, from the cache when there, measuring only what is missing.

    base: the unpruned model. variants: unit -> {level: a function building the base pruned at that one unit
        and level}; levels already in the cached table are not built. sample_shape: (C, H, W); batch: samples
        per forward. cache_dir: where tables live (None: default_cache_dir()); the file is
        <cache_key>.json, written atomically. repeats, warmup: as for compare(); each unit's levels are timed
        side by side with the base, the change is (median ratio - 1) x base time.
    progress: called with a line per unit measured.
    """
    path, table = _cached_table(base, sample_shape, batch, cache_dir)
    changed = table is None
    table = table or _new_table(base, sample_shape, batch, repeats=repeats, warmup=warmup)
    for unit, levels in variants.items():
        missing = [level for level in sorted(levels) if level > 0 and level not in table.deltas.get(unit, {})]
        if not missing:
            continue
        ratios = time_ratios([base, *(levels[level]() for level in missing)], sample_shape, batch,
                             repeats=repeats, warmup=warmup)
        table.deltas.setdefault(unit, {}).update(
            {level: (r - 1.0) * table.base_seconds for level, r in zip(missing, ratios[1:])}
        )
        changed = True
        if progress:
            progress(f"latency table: {unit} at {len(missing)} levels")
    if changed:
        _store(path, table)
    return table


def _cached_table(base: nn.Module, sample_shape: Sequence[int], batch: int,
                  cache_dir: str | Path | None) -> tuple[Path, LatencyTable | None]:
    """(the cache file of base's latency table, the table it holds, or None when there is none for base). An entry
    that is damaged or foreign (not a table's JSON, a field table_problem refuses, another model's key, a folder or
    a link) is warned about and None (cache_home.cached_entry): the caller measures again and replaces it (_store)."""
    key = cache_key(base, sample_shape, batch, device_of(base))
    folder = Path(cache_dir or default_cache_dir())
    path = folder / f"{key}.json"

    def read() -> LatencyTable:
        fix = f"measuring the base again and replacing {path}"
        data = entry_json(folder, path.name, fix, MAX_TABLE_BYTES)
        problem = table_problem(data)
        if problem:
            raise ValueError(f"{path} is damaged ({problem}); {fix}")
        if data["key"] != key:
            raise ValueError(f"{path} holds the table of key {data['key']!r}, not this model's {key!r}; {fix}")
        return LatencyTable._from_checked(data)

    return path, cached_entry(path, "the cached latency table of the base is damaged or not this model's", read)


def _store(path: Path, table: LatencyTable) -> None:
    """Write a table to its cache file atomically, over a damaged entry that is a folder or a link (which
    _cached_table warned about, and atomic_write_text would not write over)."""
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        discard(path)
    atomic_write_text(path, table.to_json())


def _new_table(base: nn.Module, sample_shape: Sequence[int], batch: int, **kwargs) -> LatencyTable:
    """A latency table of base with its forward time measured and no unit measured yet."""
    device = device_of(base)
    seconds = forward_seconds(base, sample_shape, batch, **kwargs)
    return LatencyTable(cache_key(base, sample_shape, batch, device), seconds,
                        meta={"device": _timed_on(device), "batch": batch, "torch": torch.__version__,
                              "sample_shape": list(sample_shape)})


def base_seconds(base: nn.Module, sample_shape: Sequence[int], batch: int, *, cache_dir: str | Path | None = None,
                 **kwargs) -> float:
    """Median seconds of one forward of `base` at `batch` (forward_seconds; kwargs as for compare()), measured once
    per architecture, sample shape, device, batch and torch version and cached as its latency table's base time
    (measure_table reads and extends the same file): every pruned expert of a run, in any process, is timed
    against one measurement of the base."""
    path, table = _cached_table(base, sample_shape, batch, cache_dir)
    if table is None:
        table = _new_table(base, sample_shape, batch, **kwargs)
        _store(path, table)
    return table.base_seconds


def timing_batch(model: nn.Module, sample_shape: Sequence[int], batch: int) -> int:
    """The batch at which to time pruned copies of `model` for their time ratios: `batch`, halved on a CPU while a
    forward would exceed TIMING_FLOPS (a big model's CPU forward is compute-bound, so its time ratios hardly move
    with the batch, and each forward of it costs seconds); on a GPU `batch` itself (its throughput depends on it)."""
    if device_of(model).type == "cuda":
        return batch
    flops = count_flops(as_denoiser(model), sample_shape)
    while batch > 1 and flops * batch > TIMING_FLOPS:
        batch //= 2
    return batch


class ExpertTimer:
    """Forward time ratios of pruned copies of one base at one batch: the base is timed once (base_seconds, cached
    on disk), each distinct architecture once (architecture_hash), and a copy with the base's architecture (a group
    whose budget is the whole base) is 1.0 without a forward. Ratios are of medians measured apart, not side by
    side: for a big model a side-by-side comparison timed the base again for every expert.

    base: the unpruned model; sample_shape: (C, H, W); batch: samples per forward; base_time: the base's seconds
    per forward when known (a latency table's base_seconds, so that ratios agree with its estimates), else
    base_seconds() (its cache entry read here, before any search; measured at the first expert of another
    architecture when there is none); kwargs: as for compare(). Raises
    ValueError for a base_time that is not a finite number of seconds >= MIN_FORWARD_SECONDS.
    """

    def __init__(self, base: nn.Module, sample_shape: Sequence[int], batch: int, *, base_time: float | None = None,
                 **kwargs):
        self.base, self.sample_shape, self.batch, self.kwargs = base, tuple(sample_shape), batch, kwargs
        self.base_key = architecture_hash(base, sample_shape)
        if base_time is None:  # the cache read here, before any search, so that a damaged entry is said at once;
            # the base is timed only when an expert of another architecture needs it (k=1 times nothing)
            self.base_entry, cached = _cached_table(base, sample_shape, batch, None)
            base_time = cached.base_seconds if cached is not None else None
        elif not (is_real(base_time) and math.isfinite(base_time) and base_time >= MIN_FORWARD_SECONDS):
            raise ValueError(f"base_time must be the base's seconds per forward, a finite number >= "
                             f"{MIN_FORWARD_SECONDS:g}, got {base_time!r}")
        self.base_time = base_time
        self.seconds: dict[str, float] = {}

    def ratio(self, model: nn.Module) -> float:
        """model's forward time as a fraction of the base's."""
        key = architecture_hash(model, self.sample_shape)
        if key == self.base_key:
            return 1.0
        if self.base_time is None:  # as base_seconds() does, without reading (and warning about) the entry again
            table = _new_table(self.base, self.sample_shape, self.batch, **self.kwargs)
            _store(self.base_entry, table)
            self.base_time = table.base_seconds
        if key not in self.seconds:
            self.seconds[key] = forward_seconds(model, self.sample_shape, self.batch, **self.kwargs)
        return self.seconds[key] / self.base_time
