"""The loss benchmark: forward, backward and fwd+bwd of the Adaptive-DPO loss, per provider.

Providers (all in the same run, on the same inputs):

``eager``     ``adaptive_dpo_loss(backend="torch")``, the literal reference (the baseline)
``compiled``  ``torch.compile`` of :func:`adpo_kernels.reference.forward` (same math, fused by Inductor)
``triton``, ``cuda``, ``cpu``
              ``adaptive_dpo_loss(backend=name)``, the fused kernels

A provider that cannot run here (backend not built, wrong device, Triton without a GPU)
gives ``status=skipped`` rows with the reason; one that raises gives ``status=error``
rows with the message.  Nothing is estimated or copied from another provider.

Bytes floor (the bytes that must move, each once): the forward reads ``model_pred``,
``ref_pred``, the K annotator predictions and the target; the backward reads
``model_pred`` and the target and writes the gradient; ``full`` is both.  ``pct_floor``
is the time those bytes take at the copy bandwidth measured in the same run, as a
percentage of the measured median (100% = at the copy roofline).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import harness, results

MODES = ("forward", "backward", "full")
PROVIDERS = ("eager", "compiled", "triton", "cuda", "cpu")
DTYPES = harness.DTYPES

# name -> (B pairs, per-sample shape S); inputs are (2B, *S), the shared target (B, *S)
SHAPES = {
    "tiny": (2, (4, 8, 8)),
    "small": (4, (4, 32, 32)),
    "sd15": (16, (4, 64, 64)),
    "sdxl": (32, (4, 128, 128)),
    "large": (64, (16, 128, 128)),
}


@dataclass(frozen=True)
class Case:
    shape: str
    K: int
    dtype: str

    @property
    def B(self) -> int:
        return SHAPES[self.shape][0]

    @property
    def S(self) -> tuple[int, ...]:
        return SHAPES[self.shape][1]

    @property
    def N(self) -> int:
        return math.prod(self.S)

    @property
    def esize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def input_bytes(self) -> int:
        """One ``(2B, *S)`` prediction tensor."""
        return 2 * self.B * self.N * self.esize

    def set_bytes(self) -> int:
        """One input set: model, ref, K annotators and the shared target."""
        return (2 + self.K) * self.input_bytes() + self.input_bytes() // 2

    def bytes_floor(self, mode: str) -> int:
        pred, tgt = self.input_bytes(), self.input_bytes() // 2
        fwd = (2 + self.K) * pred + tgt
        bwd = 2 * pred + tgt  # read model_pred and target, write the gradient
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def _cases(shapes, Ks, dtypes) -> list[Case]:
    return [Case(s, k, d) for s in shapes for d in dtypes for k in Ks]


# Named suites.  ``cpu-sdxl`` is the CPU goal (cpu vs compiled vs eager at sdxl, fp32 and
# bf16, on this 2-core machine); ``gpu`` is the GPU goal's shape set (bf16, fp32 for sdxl).
SUITES: dict[str, dict] = {
    "tiny": dict(cases=[Case("tiny", 2, "fp32"), Case("tiny", 0, "bf16")], rep_ms=30, warmup_ms=5, min_reps=3,
                 max_reps=20, profile=True,
                 doc="CI smoke run: tiny shape, every mode, a few repetitions (timings meaningless)"),
    "cpu": dict(cases=_cases(["sd15"], [0, 2], ["fp32", "bf16"]), rep_ms=400, warmup_ms=100, min_reps=5,
                max_reps=100, profile=True, doc="default on CPU: sd15 shape, K=0 and 2, fp32 and bf16"),
    "cpu-sdxl": dict(cases=_cases(["sdxl"], [0, 2], ["fp32", "bf16"]), rep_ms=1500, warmup_ms=200, min_reps=5,
                     max_reps=50, profile=True, providers=("eager", "compiled", "cpu"),
                     doc="the CPU goal: sdxl shape, fp32 and bf16, cpu vs compiled vs eager"),
    # K=2 first: under the GPU check's time budget the Adaptive-DPO cases are measured first
    "gpu": dict(cases=(_cases(["sd15", "sdxl", "large"], [2], ["bf16"]) + _cases(["sd15", "sdxl", "large"], [0], ["bf16"])
                       + _cases(["sdxl"], [2, 0], ["fp32"])),
                rep_ms=150, warmup_ms=50, min_reps=10, max_reps=300, profile=True,
                doc="default on CUDA: the GPU goal's shapes (sd15, sdxl, large; K=0 and 2; bf16, plus fp32 at sdxl)"),
}


# --------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------
def _reference_tuple(model_pred, ref_pred, target, annotators, cfg):
    from adpo_kernels import reference

    o = reference.forward(model_pred, ref_pred, target, annotators, cfg, True)
    return o.loss, o.logits, o.metric, o.weights, o.margin, o.implicit_acc


_compiled_ref: Optional[Callable] = None


def _compiled():
    global _compiled_ref
    if _compiled_ref is None:
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        # dynamic=False: kernels specialised to each shape, torch.compile's best case
        _compiled_ref = torch.compile(_reference_tuple, dynamic=False)
    return _compiled_ref


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype, K: int) -> str:
    """Why ``provider`` cannot run here ('' when it can)."""
    if provider in ("eager", "compiled"):
        return ""
    from adpo_kernels import dispatch

    b = dispatch.BACKENDS[provider]
    if provider == "triton" and device.type != "cuda":
        reasons = b.unavailable()
        return "; ".join(["Triton kernels need a CUDA device (the CPU interpreter is a test tool, "
                          "not benchmarked)"] + reasons)
    reasons = b.unavailable() or b.unsupported(device, dtype, K)
    return "; ".join(reasons)


def loss_fn(provider: str, cfg) -> Callable:
    """``f(model_pred, ref_pred, target, annotators) -> loss`` for a provider."""
    if provider == "compiled":
        comp = _compiled()
        return lambda mp, rp, t, an: comp(mp, rp, t, an, cfg)[0]
    import adpo_kernels as ak

    backend = "torch" if provider == "eager" else provider
    return lambda mp, rp, t, an: ak.adaptive_dpo_loss(mp, rp, t, an, cfg, backend=backend).loss


def make_inputs(case: Case, device: torch.device, seed: int):
    """Predictions near a shared target, like a trained denoiser's (never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    rows, S = 2 * case.B, case.S
    target = torch.randn((case.B,) + S, generator=g, device=device)
    full_t = target.repeat((2,) + (1,) * len(S))

    def near():
        scale = 0.05 * (1 + torch.rand((rows,) + (1,) * len(S), generator=g, device=device))
        return (full_t + scale * torch.randn((rows,) + S, generator=g, device=device)).to(dt)

    mp = near().requires_grad_(True)
    rp = near()
    an = [near() for _ in range(case.K)]
    return mp, rp, target.to(dt), an


def _first_call(f, inputs, cfg, check: bool, device) -> tuple[float, Optional[float], Optional[float]]:
    """The first fwd+bwd call, timed (it includes compilation and autotuning), and the
    relative errors of its loss and gradient against the reference run in float64."""
    from adpo_kernels import reference

    mp, rp, t, an = inputs
    harness.sync(device)
    t0 = time.perf_counter()
    loss = f(mp, rp, t, an)
    (grad,) = torch.autograd.grad(loss, mp)
    harness.sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    if not check:
        return first_ms, None, None
    mp64 = mp.detach().double().requires_grad_(True)
    ref = reference.forward(mp64, rp.double(), t.double(), [a.double() for a in an], cfg, True).loss
    (g64,) = torch.autograd.grad(ref, mp64)
    loss, ref = loss.detach(), ref.detach()
    lerr = abs(float(loss) - float(ref)) / max(abs(float(ref)), 1e-30)
    gerr = float(torch.linalg.vector_norm(grad.double() - g64) / torch.linalg.vector_norm(g64).clamp_min(1e-30))
    return first_ms, lerr, gerr


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------
def _base_row(case: Case, suite: str) -> dict:
    return {"bench": "loss", "suite": suite, "shape": case.shape, "B": case.B, "S": "x".join(map(str, case.S)),
            "K": case.K, "target": "shared", "dtype": case.dtype, "config": "paper"}


def _bench_case(case: Case, providers, modes, device, cfg, opts, copy_gbps, log) -> list[dict]:
    dt = DTYPES[case.dtype]
    base = {**_base_row(case, opts["suite"]), "copy_gbps": copy_gbps, "load_now": _load()}
    cap = (4 << 30) if device.type == "cuda" else (1 << 30)
    n_sets = harness.rotation_sets(case.set_bytes(), device, cap, max_sets=opts.get("max_sets", 32))
    sets = [make_inputs(case, device, seed) for seed in range(n_sets)]
    rows = []
    for prov in providers:
        reason = skip_reason(prov, device, dt, case.K)
        if reason:
            for mode in modes:
                rows.append({**base, "provider": prov, "mode": mode, "status": "skipped", "reason": reason})
            log(f"  {prov:9s} skipped: {reason}")
            continue
        if prov == "compiled":
            import torch._dynamo

            torch._dynamo.reset()  # each case compiles afresh, so first_call_ms is its compile time
        f = loss_fn(prov, cfg)
        try:
            first_ms, lerr, gerr = _first_call(f, sets[0], cfg, opts["check"], device)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            for mode in modes:
                rows.append({**base, "provider": prov, "mode": mode, "status": "error", "reason": msg})
            log(f"  {prov:9s} error: {msg}")
            continue
        for mode in sorted(modes, key=lambda m: m == "backward"):  # see _mode_context
            row = {**base, "provider": prov, "mode": mode, "rot_sets": n_sets,
                   "loss_rel_err": lerr, "grad_rel_err": gerr, "first_call_ms": first_ms}
            try:
                with _mode_context(prov, mode):
                    row.update(_bench_mode(f, sets, mode, case, device, opts, copy_gbps))
                row["status"], row["reason"] = "ok", ""
                log(f"  {prov:9s} {mode:8s} median {row['median_ms']:9.3f} ms  p10 {row['p10_ms']:9.3f}  "
                    f"p90 {row['p90_ms']:9.3f}  {row['gbps']:7.1f} GB/s  {row['pct_floor']:5.1f}% floor  "
                    f"reps {row['reps']}")
            except Exception as exc:
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                row.update(status="error", reason=msg)
                log(f"  {prov:9s} {mode:8s} error: {msg}")
            rows.append(row)
    del sets
    return rows


@contextlib.contextmanager
def _mode_context(provider: str, mode: str):
    """The compiled provider's backward-only mode re-runs one graph's backward
    (``retain_graph=True``), which AOTAutograd forbids when it donates the saved buffers
    to the backward; that mode alone compiles without donation, after the other modes (which
    keep torch.compile's default) and from fresh caches (each case starts fresh too)."""
    if provider != "compiled" or mode != "backward":
        yield
        return
    import torch._dynamo
    import torch._functorch.config as fconfig

    torch._dynamo.reset()
    with fconfig.patch(donated_buffer=False):
        yield


def mode_call(f: Callable, sets: list, mode: str) -> Callable[[int], object]:
    """``call(i)``: one ``mode`` call of loss function ``f`` on input set ``i``."""
    if mode == "forward":
        def call(i):
            mp, rp, t, an = sets[i]
            return f(mp, rp, t, an)
    elif mode == "full":
        def call(i):
            mp, rp, t, an = sets[i]
            return torch.autograd.grad(f(mp, rp, t, an), mp)
    else:  # backward of a retained graph, one per input set
        losses = [f(*s) for s in sets]

        def call(i):
            return torch.autograd.grad(losses[i], sets[i][0], retain_graph=True)
    return call


def _bench_mode(f, sets, mode, case: Case, device, opts, copy_gbps) -> dict:
    n = len(sets)
    call = mode_call(f, sets, mode)
    timing = harness.measure(call, device, n_sets=n, warmup_ms=opts["warmup_ms"], rep_ms=opts["rep_ms"],
                             min_reps=opts["min_reps"], max_reps=opts["max_reps"])
    out = timing.columns()
    del out["first_call_ms"]  # the provider's first fwd+bwd call is timed once, before the modes
    floor = case.bytes_floor(mode)
    med_s = timing.median * 1e-3
    out.update(bytes_floor=floor, gbps=floor / med_s / 1e9,
               pct_floor=100.0 * (floor / (copy_gbps * 1e9)) / med_s if copy_gbps else None)
    # gradient bytes are an output the caller keeps, not overhead
    grad_bytes = case.input_bytes() if mode != "forward" else 0
    one_call = lambda: call(0)  # noqa: E731
    prof = harness.profile_call(one_call, device) if opts["profile"] else harness.Profile()
    if device.type == "cuda":
        peak = harness.peak_extra_bytes_cuda(one_call, device)
    else:
        peak = prof.peak_bytes
    if peak is not None:
        extra = max(peak - grad_bytes, 0)
        out.update(peak_extra_bytes=extra, peak_extra_pct_input=100.0 * extra / case.input_bytes())
    out.update(launches=prof.launches, kernel_ms=prof.kernel_ms, alloc_bytes=prof.alloc_bytes,
               profile_error=prof.error)
    return out


COLUMNS = ["bench", "suite", "provider", "shape", "B", "S", "K", "target", "dtype", "config", "mode", "status",
           "reason", "median_ms", "p10_ms", "p90_ms", "min_ms", "max_ms", "reps", "warmup", "first_call_ms",
           "rot_sets", "load_now", "bytes_floor", "gbps", "copy_gbps", "pct_floor", "peak_extra_bytes",
           "peak_extra_pct_input", "launches", "kernel_ms", "alloc_bytes", "loss_rel_err", "grad_rel_err",
           "profile_error"]


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=sorted(SUITES), help="named set of cases (default: gpu on CUDA, else cpu)")
    p.add_argument("--shapes", type=_csv, help=f"override the suite's shapes, from {','.join(SHAPES)}")
    p.add_argument("--annotators", type=lambda s: [int(x) for x in _csv(s)], help="override K, e.g. 0,2")
    p.add_argument("--dtypes", type=_csv, help=f"override dtypes, from {','.join(DTYPES)}")
    p.add_argument("--providers", type=_csv, help=f"default: the suite's, else {','.join(PROVIDERS)}")
    p.add_argument("--modes", type=_csv, default=list(MODES), help="forward,backward,full")
    p.add_argument("--rep-ms", type=float, help="timing budget per measurement (ms)")
    p.add_argument("--warmup-ms", type=float)
    p.add_argument("--no-profile", action="store_true", help="skip the profiled call (launches, allocations)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 check of loss and gradient")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; cases not started within it are written as skipped (0: no limit)")


def run(args: argparse.Namespace, env: dict, log=print) -> list[dict]:
    """Run the loss benchmark described by ``args`` and return its rows (not yet written)."""
    device = torch.device(args.device)
    suite_name = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    suite = SUITES[suite_name]
    cases = suite["cases"]
    if args.shapes or args.annotators is not None or args.dtypes:
        shapes = args.shapes or sorted({c.shape for c in cases}, key=list(SHAPES).index)
        Ks = args.annotators if args.annotators is not None else sorted({c.K for c in cases})
        dts = args.dtypes or sorted({c.dtype for c in cases})
        cases = _cases(shapes, Ks, dts)
    for c in cases:
        if c.shape not in SHAPES or c.dtype not in DTYPES:
            raise SystemExit(f"unknown shape or dtype in {c}")
    providers = args.providers or list(suite.get("providers", PROVIDERS))
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; expected some of {PROVIDERS}")
    modes = args.modes
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; expected some of {MODES}")
    quick = getattr(args, "quick", False)
    opts = dict(suite=suite_name, check=not args.no_check, profile=suite["profile"] and not args.no_profile,
                rep_ms=args.rep_ms or suite["rep_ms"] / (3 if quick else 1),
                warmup_ms=args.warmup_ms or suite["warmup_ms"], min_reps=suite["min_reps"],
                max_reps=suite["max_reps"])

    from adpo_kernels import AdaptiveDPOConfig

    cfg = AdaptiveDPOConfig.paper()
    log(f"loss benchmark, suite {suite_name}: {len(cases)} cases x {len(providers)} providers x {len(modes)} modes "
        f"on {env['device']} (torch {env['torch']}, {env['threads']} threads, load {env['loadavg']})")
    copy_gbps = harness.copy_bandwidth_gbps(device)
    log(f"copy bandwidth measured now: {copy_gbps:.1f} GB/s (read + write)")
    t_start = time.perf_counter()
    rows = []
    stopped = None
    # A caller's timeout (bench/gpu_check.sh) sends SIGTERM: keep the cases measured so far and write
    # the rest as skipped rows, so that the CSV is complete and nothing measured is lost.
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for case in cases:
            if stopped is None:
                try:
                    log(f"{case.shape} B={case.B} S={case.S} K={case.K} {case.dtype}")
                    if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                        stopped = f"time budget of {args.time_budget:.0f} s spent before this case started"
                    else:
                        rows += _bench_case(case, providers, modes, device, cfg, opts, copy_gbps, log)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                except _Terminated:
                    stopped = "terminated by SIGTERM (the caller's time limit)"
            base = {**_base_row(case, suite_name), "status": "skipped", "reason": stopped}
            rows += [{**base, "provider": p, "mode": m} for p in providers for m in modes]
            log(f"  {case.shape} K={case.K} {case.dtype} skipped: {stopped}")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    return rows


class _Terminated(BaseException):
    """SIGTERM, raised where the benchmark is; a BaseException so per-provider error handling lets it pass."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cases left are then written as skipped
    raise _Terminated()
