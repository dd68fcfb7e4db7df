"""Atomic checkpoints: ``checkpoint-<step>`` folders that exist only when complete.

A checkpoint is written into ``.tmp-checkpoint-<step>`` (accelerate ``save_state``:
LoRA weights through a save hook as safetensors, optimizer, LR scheduler, grad scaler,
global RNG states; then the EMA annotators, the noise generator and the metric buffers
as safetensors, and ``trainer_state.json`` with the exact data position, written
last, with a manifest: the size and CRC-32 of every other file), then renamed.  ``latest``
only considers complete ``checkpoint-<step>`` folders that hold ``trainer_state.json``; a crash
mid-write leaves a ``.tmp-`` folder that is ignored and removed by the next save.  A checkpoint
whose files no longer match its manifest (truncated, deleted, bit-flipped) is reported and kept,
and ``latest`` falls back to the newest one that verifies.  A full disk while saving is named
(ENOSPC), the partial folder removed and the previous checkpoint kept.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from typing import Callable, Optional

from . import safedir
from .errors import MissingInput, UserError

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.tmp-checkpoint-\d+$")  # only the package's own: a user's .tmp-checkpoint-notes is not
RECORD_FILE = ".adpo-train-outputs.json"  # what the package wrote here: all that --overwrite_output_dir removes


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest(folder: str) -> dict:
    """``{relative path: [size, crc32]}`` of every file in ``folder`` but the trainer state."""
    out = {}
    for d, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, folder)
            if rel not in (STATE_FILE, STATE_FILE + ".partial"):
                out[rel] = [os.path.getsize(p), _crc32(p)]
    return dict(sorted(out.items()))


def verify(path: str) -> Optional[str]:
    """Why checkpoint ``path`` cannot be resumed (one phrase), or None when its files match its manifest
    (a checkpoint written before manifests: its trainer state must parse)."""
    try:
        state = read_state(path)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable ({type(e).__name__})"
    for rel, (size, crc) in (state.get("manifest") or {}).items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != size:
            return f"{rel} has {os.path.getsize(p)} bytes, {size} were written"
        if _crc32(p) != crc:
            return f"{rel} does not match its checksum"
    return None


def resolve(output_dir: str, spec: Optional[str], log=print) -> Optional[str]:
    """``--resume_from_checkpoint``: ``latest`` (the newest checkpoint that verifies, None if there is
    none yet) or a path / folder name (refused if it does not verify)."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        bad = []
        for _, path in reversed(found):
            why = verify(path)
            if why is None:
                if bad:
                    log(f"resuming from {os.path.basename(path)} instead: " + "; ".join(bad)
                        + " (kept for inspection, never deleted)")
                return path
            bad.append(f"{os.path.basename(path)} is corrupt ({why})")
        if bad:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir!r} verifies: "
                            + "; ".join(bad))
        return None
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise MissingInput(f"--resume_from_checkpoint: {spec!r} is not a complete checkpoint (a folder with "
                           f"{STATE_FILE}; 'latest' picks the newest in --output_dir)")
    why = verify(path)
    if why is not None:
        raise UserError(f"--resume_from_checkpoint: {path} is corrupt ({why}); pass an older checkpoint, or "
                        f"'latest' to take the newest that verifies")
    return path


# What a run writes into OUTPUT_DIR (besides checkpoints): replaced by --overwrite_output_dir, nothing else is.
RUN_FILES = ("metrics.jsonl", "pairs.jsonl", "train_config.json", "pytorch_lora_weights.safetensors",
             "ema_annotators.safetensors", "flipped_pairs.json", "training_curves.png", "memory_per_rank.json")
RUN_DIRS = ("unet", "validation", "latent_cache")


def run_outputs(output_dir: str, logging_dir: str = "logs") -> list[str]:
    """Names in ``output_dir`` that look like a previous run's (a fresh run is refused while any is there)."""
    if not os.path.isdir(output_dir):
        return []
    names = set(RUN_FILES) | set(RUN_DIRS) | {logging_dir}
    return sorted(n for n in os.listdir(output_dir) if n in names or _NAME.match(n) or _TMP_NAME.match(n))


def _snapshot(output_dir: str, logging_dir: str) -> dict:
    names = sorted(n for n in os.listdir(output_dir) if not n.startswith(".adpo-train")) \
        if os.path.isdir(output_dir) else []
    logs_at = os.path.join(output_dir, logging_dir)
    logs = sorted(os.path.relpath(os.path.join(d, f), logs_at) for d, _, fs in os.walk(logs_at) for f in fs)
    return {"names": names, "logs": logs}


def _read_record(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, RECORD_FILE)) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _write_record(output_dir: str, rec: dict) -> None:
    safedir.write_json(os.path.join(output_dir, RECORD_FILE), rec, indent=1)


def start_record(output_dir: str, logging_dir: str = "logs") -> None:
    """At a run's start (main process, after the lock and the checks): note what is here already, so
    that :func:`record_outputs` can tell what this run adds."""
    rec = _read_record(output_dir) or {"names": [], "logs": []}
    rec["present_at_start"] = _snapshot(output_dir, logging_dir)
    _write_record(output_dir, rec)


def record_outputs(output_dir: str, logging_dir: Optional[str] = "logs") -> None:
    """Add what appeared since :func:`start_record` to the package's record (the top-level names after
    each checkpoint, ``logging_dir=None``; the tracker files too when the run ends)."""
    rec = _read_record(output_dir)
    if rec is None or not os.path.isdir(output_dir):
        return
    start, now = rec.get("present_at_start", {}), _snapshot(output_dir, logging_dir or "logs")
    for key in ("names",) if logging_dir is None else ("names", "logs"):
        mine = set(rec.get(key, [])) | (set(now[key]) - set(start.get(key, [])))
        rec[key] = sorted(mine & set(now[key]))  # a name removed since is no longer ours to remove
    _write_record(output_dir, rec)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool, logging_dir: str = "logs",
                     remove: bool = True) -> None:
    """Refuse a fresh run into a folder holding another run, unless ``--overwrite_output_dir``
    (then that run's outputs are removed, nothing else; only where ``remove``: the main process)
    or a resume was asked for."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir: {output_dir!r} exists and is not a folder")
    found = run_outputs(output_dir, logging_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise UserError(f"--output_dir: {output_dir!r} holds another run ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}); resume it with --resume_from_checkpoint latest, "
                        f"or pass --overwrite_output_dir to replace it")
    if not remove:
        return
    rec = _read_record(output_dir)
    if rec is None:  # a folder of an adpo-train from before the record: its names, checkpoints with their state
        names = [n for n in found if n != logging_dir and (not _NAME.match(n) or os.path.isfile(
            os.path.join(output_dir, n, STATE_FILE)))]
        logs = []
    else:  # by the record: what the package wrote, nothing else (a user's file beside it stays)
        names, logs = [n for n in rec.get("names", []) if n != logging_dir], rec.get("logs", [])
    for name in names:
        if name == "latent_cache":  # may be reused by --cache_latents; build_cache replaces it safely
            continue
        _remove(os.path.join(output_dir, name))
    for rel in logs:
        _remove(os.path.join(output_dir, logging_dir, rel))
    if rec is not None:
        _write_record(output_dir, {"names": [n for n in rec.get("names", []) if n == "latent_cache"], "logs": []})


def tmp_path(output_dir: str, step: int) -> str:
    """The temporary folder checkpoint ``step`` is written into before it is renamed."""
    return os.path.join(output_dir, f"{TMP_PREFIX}{step}")


def remove_partial(output_dir: str) -> None:
    """Remove the temporary folders of saves that never completed (a crash mid-write)."""
    for name in os.listdir(output_dir):
        if _TMP_NAME.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def begin(output_dir: str, step: int) -> str:
    """Remove leftovers of interrupted saves and create the temporary folder of checkpoint ``step``."""
    remove_partial(output_dir)
    tmp = tmp_path(output_dir, step)
    os.makedirs(tmp)
    return tmp


def finish(output_dir: str, step: int, state: dict, total_limit: Optional[int] = None) -> str:
    """Write ``trainer_state.json`` last, rename the folder into place, prune old checkpoints."""
    tmp = tmp_path(output_dir, step)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    state = dict(state, manifest=manifest(tmp))
    safedir.write_json(os.path.join(tmp, STATE_FILE), state, indent=1)
    safedir.fsync_dir(tmp)
    if os.path.exists(final):
        if os.path.isfile(os.path.join(final, STATE_FILE)) and verify(final) is not None:
            n = 0  # a corrupt checkpoint of this step (the run resumed before it): kept, under another name
            while os.path.exists(f"{final}.corrupt{n}"):
                n += 1
            os.replace(final, f"{final}.corrupt{n}")
        else:
            shutil.rmtree(final)
    os.replace(tmp, final)
    safedir.fsync_dir(output_dir)
    record_outputs(output_dir, None)  # a kill -9 later: this checkpoint and the logs so far are on record
    if total_limit is not None and total_limit > 0:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk: ENOSPC, or torch's stream writer's short write
    ("unexpected pos ... vs ..."), which hides the errno."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "unexpected pos" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_disk_error(output_dir: str, step: int) -> UserError:
    kept = list_checkpoints(output_dir)
    return UserError(f"--output_dir: the disk is full (ENOSPC) while writing checkpoint-{step} in {output_dir!r}; "
                     f"the partial save was removed" + (f", {os.path.basename(kept[-1][1])} is kept" if kept else "")
                     + "; free space and resume with --resume_from_checkpoint latest")


def save_atomic(output_dir: str, step: int, write: Callable[[str], dict], total_limit: Optional[int] = None) -> str:
    """Write checkpoint ``step`` in one process: ``write(tmp_dir)`` fills the folder, returns the trainer state."""
    tmp = begin(output_dir, step)
    try:
        state = write(tmp)
        return finish(output_dir, step, state, total_limit)
    except Exception as exc:
        if not disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # ours, and incomplete; frees what it held
        raise full_disk_error(output_dir, step) from None


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
