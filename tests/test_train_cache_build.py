"""Pick-a-Pic at full size: the streaming source, the block-aware shuffle, bad data, and the latent cache
build (resumable, multi-process, deduplicated, locked)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.launch import torchrun

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _rows(n, blob=16, seed=0, captions=None):
    rng = np.random.default_rng(seed)
    return {"jpg_0": [rng.bytes(blob) for _ in range(n)], "jpg_1": [rng.bytes(blob) for _ in range(n)],
            "label_0": [float(i % 2) for i in range(n)],
            "caption": [captions[i % len(captions)] if captions else f"caption {i}" for i in range(n)]}


def _write(path, n, row_group_size, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(_rows(n, **kw)), path, row_group_size=row_group_size, compression="none")
    return path


# -- the source ------------------------------------------------------------------------------
def test_source_memory_stays_bounded_and_each_block_is_read_once(tmp_path):
    """32 row groups of 1 MiB each: iterating every pair (in the block-aware order) never holds more than the
    LRU's few blocks in arrow memory, and reads each row group once."""
    from adpo_train.data import PairBatchSampler, PickAPicPairs
    from adpo_train.source import BLOCK_CACHE

    path = _write(str(tmp_path / "d" / "train.parquet"), 256, 8, blob=64 * 1024)
    size = os.path.getsize(path)
    base = pa.total_allocated_bytes()
    pairs = PickAPicPairs(str(tmp_path / "d"))
    assert len(pairs) == 256 and len(set(pairs.block.tolist())) == 32
    sampler = PairBatchSampler(len(pairs), 8, seed=3, blocks=pairs.block, window=BLOCK_CACHE)
    peak = 0
    for batch in sampler:
        for i in batch:
            assert pairs.raw(i)["winner"] is not None
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert peak < size / 4, (peak, size)  # BLOCK_CACHE blocks (4 MiB of 32), never the table
    assert pairs.reader.blocks_read == 32


def test_block_aware_shuffle_is_a_function_of_seed_and_epoch():
    from adpo_train.data import PairBatchSampler

    blocks = np.repeat(np.arange(6), [3, 5, 4, 4, 2, 6])
    s = PairBatchSampler(len(blocks), 2, seed=1, blocks=blocks, window=2)
    s.set_epoch(1)
    order = s.order()
    assert sorted(order) == list(range(len(blocks)))
    again = PairBatchSampler(len(blocks), 2, seed=1, blocks=blocks, window=2)
    again.set_epoch(1)
    assert again.order() == order
    again.set_epoch(2)
    assert again.order() != order
    # windows of 2 blocks follow one another: a pair's window index never goes back
    seen, windows = [], []
    for i in order:
        b = int(blocks[i])
        if b not in seen:
            seen.append(b)
        windows.append(seen.index(b) // 2)
    assert windows == sorted(windows) and len(seen) == 6
    s.set_epoch(1, start=2)
    full = PairBatchSampler(len(blocks), 2, seed=1, blocks=blocks, window=2)
    full.set_epoch(1)
    assert list(s) == list(full)[2:]


def test_hub_layout_save_to_disk_and_distinct_captions(tmp_path):
    from adpo_train.data import PickAPicPairs
    from adpo_train.source import distinct_captions

    hub = tmp_path / "pickapic_v2"
    caps = ["a", "b", "a", "c"]
    _write(str(hub / "data" / "train-00000-of-00002.parquet"), 6, 4, captions=caps)
    _write(str(hub / "data" / "train-00001-of-00002.parquet"), 4, 4, captions=["d", "a"])
    _write(str(hub / "data" / "validation-00000-of-00001.parquet"), 3, 4)
    _write(str(hub / "data" / "validation_unique-00000-of-00001.parquet"), 5, 4)
    train = PickAPicPairs(str(hub))
    assert train.num_rows == 10 and train.rows.tolist() == list(range(10))
    assert PickAPicPairs(str(hub), split="validation").num_rows == 3
    assert PickAPicPairs(str(hub), split="validation_unique").num_rows == 5
    assert distinct_captions(str(hub)) == ["a", "b", "c", "d"]
    assert list(train.captions()) == ["a", "b", "a", "c", "a", "b", "d", "a", "d", "a"]
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset(pa.table(_rows(7)))})
    d.save_to_disk(str(tmp_path / "saved"), num_shards={"train": 3})
    p = PickAPicPairs(str(tmp_path / "saved"))
    assert len(p) == 7 and len(p.files) > 1 and [p.raw(i)["caption"] for i in range(7)] == [f"caption {i}"
                                                                                            for i in range(7)]
    with pytest.raises(ValueError, match="--dataset_split_name: 'test' not in"):
        PickAPicPairs(str(tmp_path / "saved"), split="test")


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_bad_data_gives_one_line_errors_and_bad_labels_are_skipped(tmp_path):
    """issue 26, defect 8: unreadable files are named with the reason, a binary caption column is a schema
    error, label_0 NaN / 7.0 are counted and skipped (never read as a preference)."""
    from adpo_train.data import PickAPicPairs
    from adpo_train.errors import UserError

    good = _write(str(tmp_path / "good.parquet"), 8, 4)
    trunc = tmp_path / "trunc" / "train.parquet"
    trunc.parent.mkdir()
    trunc.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(UserError) as e:
        PickAPicPairs(str(trunc.parent))
    _one_line(e, "cannot read", str(trunc))
    (tmp_path / "text.parquet").write_text("not parquet at all")
    with pytest.raises(UserError) as e:
        PickAPicPairs(str(tmp_path / "text.parquet"))
    _one_line(e, "cannot read", "text.parquet")
    cols = _rows(4)
    cols["caption"] = [b"\xff\xfe binary" for _ in range(4)]
    pq.write_table(pa.table(cols), tmp_path / "binary.parquet")
    with pytest.raises(UserError) as e:
        PickAPicPairs(str(tmp_path / "binary.parquet"))
    _one_line(e, "'caption' has type binary, expected string")
    cols = _rows(6)
    cols["label_0"] = [1.0, float("nan"), 0.0, 7.0, 0.5, 1.0]
    pq.write_table(pa.table(cols), tmp_path / "labels.parquet")
    p = PickAPicPairs(str(tmp_path / "labels.parquet"))
    assert (p.num_rows, p.num_ties, p.num_bad_labels, p.rows.tolist()) == (6, 1, 2, [0, 2, 5])


# -- the cache build ---------------------------------------------------------------------------------
def _assets():
    from tests.test_train_fixtures import toy_assets

    return toy_assets()


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _build(out, **kw):
    from adpo_train.cache import build_cache

    a = _assets()
    args = dict(resolution=32, batch_size=2, shard_size=4, flip_ratio=0.25, flip_seed=3, device="cpu",
                log=lambda *x: None, hflip=True)
    args.update(kw)
    return build_cache(a["model"], a["data"], str(out), **args)


def test_interrupted_build_continues_to_the_same_bytes(tmp_path, monkeypatch):
    from adpo_train import cache
    from adpo_train.errors import UserError

    ref = _build(tmp_path / "ref")
    assert len(ref["shards"]) == 6 and ref["num_texts"] < ref["num_pairs"]  # 24 kept pairs, 1 corrupt
    real, calls = cache._write_shard, []

    def dies_after_three(tensors, folder, name, metadata):
        if len(calls) == 3:
            open(os.path.join(folder, name + ".partial"), "wb").write(b"half a shard")  # kill -9 mid-write
            raise KeyboardInterrupt
        calls.append(name)
        real(tensors, folder, name, metadata)

    monkeypatch.setattr(cache, "_write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "c")
    monkeypatch.setattr(cache, "_write_shard", real)
    tmp = tmp_path / "c.tmp"
    kept = {n: os.stat(tmp / n).st_mtime_ns for n in calls}
    with pytest.raises(UserError) as e:  # other arguments than the partial build's
        _build(tmp_path / "c", seed=1)
    _one_line(e, "--seed 0", "--restart_cache")
    logs = []
    meta = _build(tmp_path / "c", log=logs.append, num_workers=1)  # workers do not change the bytes
    assert any("continuing the build" in m and "3 of this process's" in m for m in logs), logs
    assert {n: os.stat(tmp_path / "c" / n).st_mtime_ns for n in calls} == kept  # completed shards kept
    assert meta == ref and _files(tmp_path / "c") == _files(tmp_path / "ref")
    assert not tmp.exists()
    # --restart_cache: a partial build with other arguments is discarded
    monkeypatch.setattr(cache, "_write_shard", dies_after_three)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "d", seed=1)
    monkeypatch.setattr(cache, "_write_shard", real)
    assert _build(tmp_path / "d", restart=True) == ref
    assert _files(tmp_path / "d") == _files(tmp_path / "ref")


def test_two_process_build_gives_the_same_cache(tmp_path):
    """torchrun with 2 processes (gloo): each encodes its share, rank 0 writes the index; same bytes."""
    a = _assets()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has (OMP_NUM_THREADS=1): the VAE's conv sums in the same order
    try:
        ref = _build(tmp_path / "ref", hflip=False, flip_ratio=0.0, flip_seed=0)  # the CLI's defaults
    finally:
        torch.set_num_threads(threads)
    torchrun(["-m", "adpo_train", "cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", a["data"],
              "--latent_cache", str(tmp_path / "two"), "--resolution", "32", "--batch_size", "2", "--shard_size", "4",
              "--no_hflip", "--device", "cpu", "--dataloader_num_workers", "1"], tmp_path / "logs", timeout=240)
    assert json.load(open(tmp_path / "two" / "index.json")) == ref
    assert _files(tmp_path / "two") == _files(tmp_path / "ref")
    assert not (tmp_path / "two.tmp").exists()


def test_dedup_trains_the_same_losses_as_per_pair_text(tmp_path):
    from tests.test_train_fixtures import run_trainer

    a = _assets()
    per_pair = _build(tmp_path / "per_pair", dedup_text=False)
    dedup = _build(tmp_path / "dedup")
    kept = per_pair["num_pairs"] + per_pair["num_corrupt"]  # texts are encoded before the images are decoded
    assert per_pair["num_texts"] == kept and dedup["num_texts"] < kept
    assert dedup["bytes_per_pair"] < per_pair["bytes_per_pair"]
    losses = []
    for name in ("per_pair", "dedup"):
        run_trainer(["--pretrained_model_name_or_path", a["model"], "--latent_cache", str(tmp_path / name),
                     "--output_dir", str(tmp_path / f"run_{name}"), "--train_batch_size", "4", "--max_train_steps",
                     "3", "--logging_steps", "1"])
        losses.append([json.loads(r)["loss"] for r in open(tmp_path / f"run_{name}" / "metrics.jsonl")])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_second_build_is_refused_and_never_removes_the_first_ones_tmp(tmp_path):
    """issue 26, defect 1: while one build holds ``<cache>.lock``, another is refused naming its pid and
    leaves the first one's ``.tmp`` alone (before: it was removed and the builds mixed)."""
    from adpo_train import locks, safedir
    from adpo_train.errors import UserError

    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from adpo_train import locks\n"
                               f"with locks.hold({locks.lock_path(str(out), inside=False)!r}, 'x', 'y'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        tmp = safedir.begin(str(out), "--latent_cache", "latent cache")
        open(os.path.join(tmp, "shard-00000.safetensors"), "w").write("the first build's")
        with pytest.raises(UserError) as e:
            _build(out)
        _one_line(e, "--latent_cache", f"pid {holder.pid}")
        assert open(os.path.join(tmp, "shard-00000.safetensors")).read() == "the first build's"
    finally:
        holder.kill()
        holder.wait()


def test_cache_dtype_follows_mixed_precision_and_v1_caches_load(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from adpo_train.cli import main
    from adpo_train.data import CachedPairDataset
    from adpo_train.errors import UserError

    a = _assets()
    assert main(["cache", "--pretrained_model_name_or_path", a["model"], "--dataset_name", a["data"],
                 "--latent_cache", str(tmp_path / "bf16"), "--resolution", "32", "--max_train_samples", "4",
                 "--mixed_precision", "bf16", "--device", "cpu"]) == 0
    assert "bytes/pair" in capsys.readouterr().out
    ds = CachedPairDataset(str(tmp_path / "bf16"))
    assert ds.meta["dtype"] == "bfloat16" and ds[0]["latents"].dtype == ds[0]["text"].dtype == torch.bfloat16
    # the same pairs written in the v1 layout (text per pair) read the same
    v1 = tmp_path / "v1"
    v1.mkdir()
    shard = load_file(str(tmp_path / "bf16" / ds.meta["shards"][0]["file"]))
    text = torch.stack([ds[i]["text"] for i in range(len(ds))])
    save_file({"latents": shard["latents"], "text": text, "flipped": shard["flipped"], "row": shard["row"]},
              str(v1 / "shard-00000.safetensors"))
    meta = {**ds.meta, "format": "adpo-train latent cache v1", "shards": [{"file": "shard-00000.safetensors",
                                                                          "num_pairs": len(ds)}]}
    json.dump(meta, open(v1 / "index.json", "w"))
    old = CachedPairDataset(str(v1))
    for i in range(len(ds)):
        assert torch.equal(old[i]["text"], ds[i]["text"]) and torch.equal(old[i]["latents"], ds[i]["latents"])
    json.dump({**meta, "format": "adpo-train latent cache v0"}, open(v1 / "index.json", "w"))
    with pytest.raises(UserError) as e:
        CachedPairDataset(str(v1))
    _one_line(e, "rebuild it with `adpo-train cache`")
