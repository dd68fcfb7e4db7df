"""The measuring core shared by every benchmark (loss, trainer): machine and version
facts, timing, memory, copy bandwidth and profiles.

Timing rules (see docs/benchmarks.md, "Method"):

* warm-up first (compilation, autotuning and allocator growth stay out of the numbers;
  the first call's time is kept separately as ``first_call_ms``);
* rotating input sets, so that repeated calls do not find their inputs in a cache
  (``rotation_sets`` sizes them against the last-level cache);
* on a GPU, CUDA events around each call and one synchronisation at the end; on the
  CPU, ``time.perf_counter_ns`` around each (synchronous) call;
* the median with the 10th and 90th percentiles over as many repetitions as fit in a
  time budget (``rep_ms``), between ``min_reps`` and ``max_reps``.
"""
from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import platform
import secrets
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the benchmark dtypes by their names in the CSV rows and on the command line
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------
# machine and versions
# --------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip()
    except Exception:
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> tuple[str, str]:
    """(sha, "dirty"/"clean"/"") of the checkout; ``ADPO_GIT_SHA`` wins (the GPU machine
    gets a copy of the working tree without ``.git``)."""
    env = os.environ.get("ADPO_GIT_SHA", "")
    if env:
        return env[:12], os.environ.get("ADPO_GIT_DIRTY", "")
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not sha:
        return "unknown", ""
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha, ("dirty" if dirty else "clean")


def env_info(device: torch.device, note: str = "") -> dict:
    """The columns every result row carries: which machine, which software, when."""
    sha, dirty = git_sha()
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = props.name
        mem = f"{props.total_memory / 2**30:.0f} GiB"
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={idx}"])
        driver = driver.splitlines()[0] if driver else ""
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores)"
        mem, driver = "", ""
    now = datetime.now(timezone.utc)
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    return {
        "device": name,
        "device_type": device.type,
        "device_mem": mem,
        "driver": driver,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "loadavg": load,
        "git_sha": sha,
        "git_state": dirty,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3),
        "note": note,
    }


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that repeated calls could hit."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or (32 << 20)


def rotation_sets(set_bytes: int, device: torch.device, cap_bytes: int, max_sets: int = 32) -> int:
    """How many input sets to rotate through so each call starts with cold inputs:
    together at least twice the last-level cache, at least 2 when affordable, at most
    ``max_sets`` and ``cap_bytes`` in all."""
    want = max(2, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1)))
    afford = max(1, cap_bytes // max(set_bytes, 1))
    return int(max(1, min(want, afford, max_sets)))


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_ms: list[float]
    first_call_ms: float
    warmup_calls: int

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times_ms)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def columns(self) -> dict:
        return {"median_ms": self.median, "p10_ms": self.quantile(0.1), "p90_ms": self.quantile(0.9),
                "min_ms": min(self.times_ms), "max_ms": max(self.times_ms), "reps": self.reps,
                "warmup": self.warmup_calls, "first_call_ms": self.first_call_ms}


def measure(fn: Callable[[int], object], device: torch.device, n_sets: int = 1, warmup_ms: float = 100.0,
            rep_ms: float = 500.0, min_reps: int = 5, max_reps: int = 200, min_warmup: int = 2) -> Timing:
    """Time ``fn(i)`` (``i`` picks the input set, rotating over ``n_sets``).

    The first call is timed alone (it may compile); then warm-up calls run for
    ``warmup_ms`` (at least ``min_warmup``); then calls are timed one by one until
    ``rep_ms`` is spent (between ``min_reps`` and ``max_reps``).
    """
    cuda = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    fn(0)
    sync(device)
    first = (time.perf_counter() - t0) * 1e3

    # warm-up, which also estimates the time of one call
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls % n_sets)
        calls += 1
        sync(device)
        spent = (time.perf_counter() - t0) * 1e3
        if calls >= min_warmup and spent >= warmup_ms:
            break
        if calls >= max(min_warmup, 1000):
            break
    est = spent / calls
    reps = int(min(max_reps, max(min_reps, rep_ms / max(est, 1e-3))))

    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for r in range(reps):
                starts[r].record()
                fn((calls + r) % n_sets)
                ends[r].record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            times = []
            for r in range(reps):
                t = time.perf_counter_ns()
                fn((calls + r) % n_sets)
                times.append((time.perf_counter_ns() - t) / 1e6)
    finally:
        if gc_was:
            gc.enable()
    return Timing(times, first, calls)


def copy_bandwidth_gbps(device: torch.device, nbytes: Optional[int] = None, reps: int = 10) -> float:
    """Device-memory copy bandwidth measured now, counting bytes read plus bytes written
    (the ceiling that the loss kernels' GB/s are compared with)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda i: dst.copy_(src), device, warmup_ms=50, rep_ms=300, min_reps=reps, max_reps=50)
    del src, dst
    return 2 * n * 4 / (timing.median * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# memory and profiles
# --------------------------------------------------------------------------------------
def peak_extra_bytes_cuda(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


@dataclass
class Profile:
    launches: Optional[int] = None  # GPU kernels, memsets and memcpys the call started
    kernel_ms: Optional[float] = None  # their summed device time
    alloc_bytes: Optional[int] = None  # everything the call allocated (intermediates it materialised)
    peak_bytes: Optional[int] = None  # peak of allocations minus frees during the call
    error: str = ""


def _allocations(prof, device_type: str) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType  # the profiler's event tree (stable since 2.0)

    out: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if (f.device_type.name.lower() == device_type) if hasattr(f, "device_type") else True:
                out.append((node.start_time_ns, int(f.alloc_size)))
        stack.extend(node.children)
    out.sort()
    return out


def profile_call(fn: Callable[[], object], device: torch.device) -> Profile:
    """One call of ``fn`` under the torch profiler: launches and device time (GPU), bytes
    allocated and the peak of live allocations (both devices).

    The torch profiler does not count DRAM traffic; the bytes a kernel *must* move are
    computed from the shapes instead (``bytes_floor``), and ``alloc_bytes`` shows the
    intermediates a provider materialises on top of that.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    res = Profile()
    try:
        sync(device)
        with profile(activities=acts, profile_memory=True) as prof:
            out = fn()
            sync(device)
        del out
    except Exception as exc:  # a profiler failure must not lose the timing rows
        res.error = f"profiler: {type(exc).__name__}: {exc}"
        return res
    try:
        allocs = _allocations(prof, device.type)
        cur = peak = total = 0
        for _, b in allocs:
            cur += b
            peak = max(peak, cur)
            total += max(b, 0)
        res.alloc_bytes, res.peak_bytes = total, peak
    except Exception as exc:
        res.error = f"memory events: {type(exc).__name__}: {exc}"
    if device.type == "cuda":
        try:
            dev_events = [e for e in prof.profiler.kineto_results.events()
                          if e.device_type() == torch.autograd.DeviceType.CUDA]
            res.launches = len(dev_events)
            res.kernel_ms = sum(e.duration_ns() for e in dev_events) / 1e6
        except Exception as exc:
            res.error = (res.error + "; " if res.error else "") + f"device events: {type(exc).__name__}: {exc}"
    return res
