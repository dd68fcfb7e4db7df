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


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "bitflip":
        mid = len(data) // 2
        open(path, "wb").write(data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1:])
    else:
        os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
def test_a_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, how, capsys):
    """Defect 5 and 9: a truncated, bit-flipped or deleted file of the latest checkpoint is caught by its
    manifest; ``latest`` resumes from the one before, reports the corrupt one and keeps it."""
    out = tmp_path / "run"
    flags = ("--max_train_steps", "6", "--checkpointing_steps", "2")
    assert train_on_toy_cache(out, *flags, "--stop_after_steps", "4")["stopped"]
    victim = next(p for p in sorted((out / "checkpoint-4").rglob("*")) if p.is_file()
                  and p.name.endswith((".safetensors", ".bin")) and p.stat().st_size > 64)
    _corrupt(victim, how)
    capsys.readouterr()
    from adpo_train import checkpoint as ckpt

    assert ckpt.verify(str(out / "checkpoint-4")) is not None and ckpt.verify(str(out / "checkpoint-2")) is None
    with pytest.raises(UserError, match="checkpoint-4 is corrupt"):
        train_on_toy_cache(out, *flags, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert train_on_toy_cache(out, *flags, "--resume_from_checkpoint", "latest")["global_step"] == 6
    assert os.path.isdir(out / "checkpoint-4.corrupt0"), os.listdir(out)  # kept, under another name
    assert ckpt.verify(str(out / "checkpoint-4")) is None  # rewritten by the resumed run


def test_a_full_disk_while_checkpointing_is_named_and_the_previous_one_kept(tmp_path, monkeypatch):
    """Defect 9: torch's writer reported a full disk as 'unexpected pos 93440 vs 93328'."""
    from adpo_train import trainer

    real = trainer._write_checkpoint_files

    def full_at_step_4(run, meta, path):
        real(run, meta, path)
        if meta["global_step"] == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed... unexpected pos 93440 vs 93328")
        return meta

    monkeypatch.setattr(trainer, "_write_checkpoint_files", full_at_step_4)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"disk is full \(ENOSPC\) while writing checkpoint-4.*checkpoint-2 is kept"):
        train_on_toy_cache(out, "--max_train_steps", "6", "--checkpointing_steps", "2")
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2"]


def test_latest_with_no_checkpoint_yet_starts_fresh(tmp_path):
    """Defect 6: a run that died before its first checkpoint; the requeue's 'latest' was refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')  # the dead run's log
    (out / "notes.txt").write_text("mine")
    assert train_on_toy_cache(out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")["global_step"] == 2
    assert (out / "notes.txt").read_text() == "mine"
    # a finished run (its final weights) with no checkpoint left is never replaced that way
    import shutil

    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p)
    with pytest.raises(UserError, match="holds another run"):
        train_on_toy_cache(out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")


def test_a_resume_with_changed_math_is_refused_unless_allowed(tmp_path, capsys):
    """Defect 2: a changed --learning_rate was ignored silently, --train_batch_size / --seed applied from the
    resume step on, --rank crashed with a state_dict size mismatch; train_config.json was overwritten."""
    import json

    out = tmp_path / "run"
    flags = ("--max_train_steps", "4", "--checkpointing_steps", "2")
    assert train_on_toy_cache(out, *flags, "--stop_after_steps", "2")["stopped"]
    resume = ("--resume_from_checkpoint", "latest")
    with pytest.raises(UserError) as e:
        train_on_toy_cache(out, *flags, *resume, "--learning_rate", "1e-4", "--seed", "3")
    msg = str(e.value)
    assert "\n" not in msg and "--learning_rate: 1e-05 -> 0.0001" in msg and "--seed: 0 -> 3" in msg, msg
    assert "--allow_config_change" in msg
    for bad in (("--rank", "4"), ("--rank", "4", "--allow_config_change")):
        with pytest.raises(UserError, match=r"--rank: 8 -> 4.*cannot change on a resume"):
            train_on_toy_cache(out, *flags, *resume, *bad)
    capsys.readouterr()
    assert train_on_toy_cache(out, *flags, *resume, "--learning_rate", "1e-4", "--allow_config_change",
                              "--quiet")["global_step"] == 4
    cfg = json.load(open(out / "train_config.json"))
    assert cfg["args"]["learning_rate"] == 1e-4 and cfg["started_at_step"] == 2
    assert [h["args"]["learning_rate"] for h in cfg["history"]] == [1e-5] and cfg["history"][0]["started_at_step"] == 0


def test_overwrite_removes_only_what_the_package_wrote(tmp_path):
    """Defect 7: --overwrite_output_dir deleted a user's checkpoint-5000/important.txt, .tmp-checkpoint-notes-mine/
    and logs/mine.txt; a user's .tmp-checkpoint-* folder blocked a fresh run."""
    out = tmp_path / "run"
    (out / ".tmp-checkpoint-notes-mine").mkdir(parents=True)
    (out / ".tmp-checkpoint-notes-mine" / "n.txt").write_text("mine")
    # a fresh run is not blocked by the user's folder, and no save removes it
    assert train_on_toy_cache(out, "--max_train_steps", "2", "--checkpointing_steps", "1")["global_step"] == 2
    assert (out / ".tmp-checkpoint-notes-mine" / "n.txt").read_text() == "mine"
    (out / "checkpoint-5000").mkdir()
    (out / "checkpoint-5000" / "important.txt").write_text("mine")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "mine.txt").write_text("mine")
    (out / "metrics_by_hand.csv").write_text("mine")
    ours = {"checkpoint-1", "checkpoint-2", "metrics.jsonl", "train_config.json", "pytorch_lora_weights.safetensors"}
    assert ours <= set(os.listdir(out))
    assert train_on_toy_cache(out, "--max_train_steps", "1", "--checkpointing_steps", "100",
                              "--overwrite_output_dir")["global_step"] == 1
    for p in (".tmp-checkpoint-notes-mine/n.txt", "checkpoint-5000/important.txt", "logs/mine.txt",
              "metrics_by_hand.csv"):
        assert (out / p).read_text() == "mine", p
    assert not (out / "checkpoint-2").exists()  # the first run's (checkpoint-1 is the new run's last step)


def test_probe_refuses_while_held_and_never_blocks_itself(tmp_path):
    """Every rank of a multi-process run probes the lock before the main process takes it: a shared lock
    that conflicts with a holder, not with the other ranks' probes, and is gone at once."""
    path = locks.lock_path(str(tmp_path), inside=True)
    locks.probe(path, "output folder x", "--output_dir")  # no lock file yet
    with locks.hold(path, "output folder x", "--output_dir"):
        with pytest.raises(UserError, match=rf"--output_dir: the output folder x is in use .*pid {os.getpid()}"):
            locks.probe(path, "output folder x", "--output_dir")
    locks.probe(path, "output folder x", "--output_dir")
    locks.probe(path, "output folder x", "--output_dir")
    with locks.hold(path, "output folder x", "--output_dir"):  # the probes left nothing held
        pass
