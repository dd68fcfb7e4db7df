"""Nothing lost under faults, on the trainer's side: one run per output folder."""
import os

import pytest

from adpo_train import locks
from adpo_train.errors import UserError
from tests.test_train_fixtures import train_on_toy_cache


def test_second_trainer_on_the_same_output_dir_is_refused_naming_the_pid(tmp_path):
    out = tmp_path / "run"
    assert train_on_toy_cache(out, "--max_train_steps", "1")["global_step"] == 1
    before = sorted(os.listdir(out))
    with locks.hold(locks.lock_path(str(out), inside=True), f"output folder {out}", "--output_dir"):
        # (a plain fresh run is refused earlier, for the run it finds there, touching nothing)
        for flags in (("--overwrite_output_dir",), ("--resume_from_checkpoint", "latest")):
            with pytest.raises(UserError) as e:
                train_on_toy_cache(out, "--max_train_steps", "1", *flags)
            msg = str(e.value)
            assert "\n" not in msg and "--output_dir" in msg and f"pid {os.getpid()}" in msg, flags
            assert sorted(os.listdir(out)) == before, f"{flags}: the refused run touched the running one's files"
    # released: the same folder trains once the holder is gone
    assert train_on_toy_cache(out, "--max_train_steps", "1", "--overwrite_output_dir")["global_step"] == 1


_SAVE = """
import sys, torch
from adpo_train.models import add_lora, build_unet, save_lora_diffusers
unet = build_unet("tiny", seed=0)
torch.manual_seed(0)
add_lora(unet, 4)
save_lora_diffusers(unet, sys.argv[1])
"""


def test_lora_file_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    # peft keeps target_modules as a set: its order (and so the safetensors header) followed
    # PYTHONHASHSEED until save_lora_diffusers sorted it
    import subprocess
    import sys

    from adpo_train.models import LORA_WEIGHT_NAME

    blobs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", _SAVE, str(out)], check=True, env=env, capture_output=True)
        blobs.append((out / LORA_WEIGHT_NAME).read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


def test_jsonl_appends_whole_lines_and_trim_drops_a_torn_one(tmp_path):
    from adpo_train import jsonl

    p = str(tmp_path / "metrics.jsonl")
    jsonl.append(p, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}])
    jsonl.append(p, [{"step": 3, "loss": 0.125}])
    with open(p, "ab") as f:
        f.write(b'{"step": 4, "lo')  # a disk that filled inside the last append
    rows, bad = jsonl.read(p)
    assert [r["step"] for r in rows] == [1, 2, 3] and bad == 1
    notes = []
    jsonl.trim(p, 2, notes.append)
    assert open(p).read() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'
    assert len(notes) == 1 and "dropped 1 torn" in notes[0]


def test_resume_after_a_torn_metrics_line_continues(tmp_path):
    """Defect 4: a partial last line of metrics.jsonl made every later resume a JSONDecodeError."""
    out = tmp_path / "run"
    flags = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1")
    assert train_on_toy_cache(out, *flags, "--stop_after_steps", "3")["stopped"]
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "loss": 0.69')
    assert train_on_toy_cache(out, *flags, "--resume_from_checkpoint", "latest")["global_step"] == 4
    import json

    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4], steps


def test_a_full_disk_while_logging_is_named(tmp_path, monkeypatch):
    import errno

    from adpo_train import jsonl

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonl, "_write", full)
    with pytest.raises(UserError, match=r"the disk is full \(ENOSPC\) while appending to .*metrics.jsonl"):
        train_on_toy_cache(tmp_path / "run", "--max_train_steps", "2", "--logging_steps", "1")
