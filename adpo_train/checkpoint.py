"""Atomic checkpoints: ``checkpoint-<step>`` folders that exist only when complete.

A checkpoint is written into ``.tmp-checkpoint-<step>`` (accelerate ``save_state``:
LoRA weights through a save hook as safetensors, optimizer, LR scheduler, grad scaler,
global RNG states; then the EMA annotators, the noise generator and the metric buffers
as safetensors, and ``trainer_state.json`` with the exact data position, written
last), then renamed.  ``latest`` only considers complete ``checkpoint-<step>`` folders
that hold ``trainer_state.json``; a crash mid-write leaves a ``.tmp-`` folder that is
ignored and removed by the next save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Optional

from .errors import MissingInput, UserError

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def resolve(output_dir: str, spec: Optional[str]) -> Optional[str]:
    """``--resume_from_checkpoint``: ``latest`` (None if there is none yet) or a path / folder name."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise MissingInput(f"--resume_from_checkpoint: {spec!r} is not a complete checkpoint (a folder with "
                           f"{STATE_FILE}; 'latest' picks the newest in --output_dir)")
    return path


# What a run writes into OUTPUT_DIR (besides checkpoints): replaced by --overwrite_output_dir, nothing else is.
RUN_FILES = ("metrics.jsonl", "pairs.jsonl", "train_config.json", "pytorch_lora_weights.safetensors",
             "ema_annotators.safetensors", "flipped_pairs.json", "training_curves.png", "memory_per_rank.json")
RUN_DIRS = ("unet", "validation", "latent_cache")


def run_outputs(output_dir: str, logging_dir: str = "logs") -> list[str]:
    """Names in ``output_dir`` that a previous run wrote."""
    if not os.path.isdir(output_dir):
        return []
    names = set(RUN_FILES) | set(RUN_DIRS) | {logging_dir}
    return sorted(n for n in os.listdir(output_dir)
                  if n in names or _NAME.match(n) or n.startswith(TMP_PREFIX))


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
    for name in found if remove else ():
        if name == "latent_cache":  # may be reused by --cache_latents; build_cache replaces it safely
            continue
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(output_dir: str, step: int) -> str:
    """The temporary folder checkpoint ``step`` is written into before it is renamed."""
    return os.path.join(output_dir, f"{TMP_PREFIX}{step}")


def remove_partial(output_dir: str) -> None:
    """Remove the temporary folders of saves that never completed (a crash mid-write)."""
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX):
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
    with open(os.path.join(tmp, STATE_FILE + ".part"), "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(tmp, STATE_FILE + ".part"), os.path.join(tmp, STATE_FILE))
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if total_limit is not None and total_limit > 0:
        for _, path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def save_atomic(output_dir: str, step: int, write: Callable[[str], dict], total_limit: Optional[int] = None) -> str:
    """Write checkpoint ``step`` in one process: ``write(tmp_dir)`` fills the folder, returns the trainer state."""
    tmp = begin(output_dir, step)
    state = write(tmp)
    return finish(output_dir, step, state, total_limit)


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
