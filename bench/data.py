"""``python -m bench data``: the Pick-a-Pic data path at scale, on synthetic parquet written here.

Rows (``case``):

* ``build``: ``adpo-train cache`` pairs/s with 0, 1 and 2 DataLoader decode workers (``workers``), on
  ``--pairs`` pairs of real JPEGs (``--image_size`` px, decoded and resized to ``--resolution``), the
  toy model's VAE and text encoder; ``bytes_per_pair`` of the v2 cache it wrote.
* ``rss``: peak RSS over the import baseline of a process that indexes a parquet folder and reads every
  pair's bytes in the block-aware shuffle order, at two dataset sizes (``dataset_mb``): flat when the
  source holds no more than its LRU of blocks (issue 23: the old reader held the whole table).
* ``loader``: pairs/s of the cached loader (``CachedPairDataset`` + the trainer's DataLoader, 0 workers)
  and ``step_pairs_per_s`` of the trainer's own step on the same cache (the toy UNet on this device):
  the loader must never be the bottleneck (``loader_pairs_per_s`` >> ``step_pairs_per_s``).
* ``computed``: v2 bytes per pair from the shapes (``bench.data.bytes_per_pair``) for SD1.5 at 512 and
  SDXL at 1024 in bf16, per-caption text amortised over ``--pairs_per_caption`` pairs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

COLUMNS = ["bench", "name", "case", "model", "workers", "num_pairs", "dataset_mb", "pairs_per_s", "peak_rss_mb", "bytes_per_pair",
           "anon_rss_mb", "blocks_read",
           "loader_pairs_per_s", "step_pairs_per_s", "seconds"]


def add_arguments(p) -> None:
    p.add_argument("--pairs", type=int, default=128, help="pairs of the build rows")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rss_mb", type=int, default=64, help="the smaller dataset of the rss rows (the other is 4x)")
    p.add_argument("--pairs_per_caption", type=float, default=16.0,
                   help="pairs per distinct caption in the computed rows")


def bytes_per_pair(latent_shape, text_shape, pooled_dim: int, itemsize: int, pairs_per_caption: float,
                   sdxl: bool) -> float:
    """v2 cache bytes per pair: both latents (+ SDXL time ids, fp32) and 4 int64 per pair (text id, row,
    pair) + 1 byte flip, plus the text (+ pooled) of its caption divided by ``pairs_per_caption``."""
    per_pair = 2 * int(np.prod(latent_shape)) * itemsize + 3 * 8 + 1 + (2 * 6 * 4 if sdxl else 0)
    per_caption = (int(np.prod(text_shape)) + pooled_dim) * itemsize
    return per_pair + per_caption / pairs_per_caption


def computed_rows(pairs_per_caption: float) -> list[dict]:
    rows = []
    for model, lat, text, pooled, sdxl in (("sd15-512", (4, 64, 64), (77, 768), 0, False),
                                           ("sdxl-1024", (4, 128, 128), (77, 2048), 1280, True)):
        rows.append({"case": "computed", "model": model, "bytes_per_pair":
                     bytes_per_pair(lat, text, pooled, 2, pairs_per_caption, sdxl)})
    return rows


def _jpeg(rng, size: int) -> bytes:
    from PIL import Image

    small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)  # smooth, photo-like content
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_parquet(path: str, num_pairs: int, size: int, seed: int = 0) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cols = {"jpg_0": [_jpeg(rng, size) for _ in range(num_pairs)], "jpg_1": [_jpeg(rng, size) for _ in range(num_pairs)],
            "label_0": [float(i % 2) for i in range(num_pairs)],
            "caption": [f"a photo of thing {i % 16}" for i in range(num_pairs)]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=32)
    return path


def write_blob_parquet(folder: str, megabytes: int, blob: int = 256 * 1024, seed: int = 0) -> str:
    """A Pick-a-Pic-schema folder of ``megabytes`` MB of random 'image' bytes (the rss rows read bytes only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = max(8, megabytes * 2**20 // (2 * blob))
    per_file = 64
    for f in range(0, n, per_file):
        m = min(per_file, n - f)
        cols = {"jpg_0": [rng.bytes(blob) for _ in range(m)], "jpg_1": [rng.bytes(blob) for _ in range(m)],
                "label_0": [float(i % 2) for i in range(m)], "caption": [f"c{i}" for i in range(m)]}
        os.makedirs(os.path.join(folder, "data"), exist_ok=True)
        pq.write_table(pa.table(cols), os.path.join(folder, "data", f"train-{f // per_file:05d}.parquet"),
                       row_group_size=8, compression="none")
    return folder


_RSS_CHILD = r"""
import json, sys
from adpo_train.data import PairBatchSampler, PickAPicPairs
from adpo_train.source import BLOCK_CACHE

def status(key):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS: imports excluded
base, anon0 = status("VmRSS"), status("RssAnon")
pairs = PickAPicPairs(sys.argv[1])
s = PairBatchSampler(len(pairs), 8, seed=0, blocks=pairs.block, window=BLOCK_CACHE)
n = sum(len(pairs.raw(i)["winner"]) > 0 for b in s for i in b)
print(json.dumps({"pairs": n, "base_kb": base, "peak_kb": status("VmHWM"), "anon_kb": status("RssAnon") - anon0,
                  "blocks_read": pairs.reader.blocks_read}))
"""


def _rss_row(folder: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, folder], capture_output=True, text=True, env=env,
                         check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    return {"case": "rss", "num_pairs": r["pairs"], "dataset_mb": size / 2**20,
            "peak_rss_mb": (r["peak_kb"] - r["base_kb"]) / 1024, "anon_rss_mb": r["anon_kb"] / 1024,
            "blocks_read": r["blocks_read"]}


def run(args, env, log) -> list[dict]:
    from adpo_train import toy
    from adpo_train.cache import build_cache

    rows = computed_rows(args.pairs_per_caption)
    quick = getattr(args, "quick", False)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as root:
        t = time.time()
        model = toy.write_toy_model(os.path.join(root, "model"), pretrain_steps=0)
        data = write_jpeg_parquet(os.path.join(root, "jpeg", "train.parquet"), args.pairs // (2 if quick else 1),
                                  args.image_size)
        log(f"synthetic data and toy model in {time.time() - t:.1f}s")
        cache = None
        for workers in (0, 1, 2):
            out = os.path.join(root, f"cache-{workers}")
            t = time.time()
            meta = build_cache(model, data, out, resolution=args.resolution, batch_size=16, shard_size=64,
                               device=args.device, log=lambda *a: None, num_workers=workers, dtype="bfloat16")
            dt = time.time() - t
            rows.append({"case": "build", "model": "toy", "workers": workers, "num_pairs": meta["num_pairs"],
                         "pairs_per_s": meta["num_pairs"] / dt, "bytes_per_pair": meta["bytes_per_pair"],
                         "seconds": dt})
            log(f"build, {workers} decode workers: {rows[-1]['pairs_per_s']:.1f} pairs/s")
            cache = out
        for mb in (args.rss_mb, 4 * args.rss_mb):
            rows.append(_rss_row(write_blob_parquet(os.path.join(root, f"blobs-{mb}"), mb)))
            log(f"rss: {rows[-1]['dataset_mb']:.0f} MB dataset -> peak {rows[-1]['peak_rss_mb']:.0f} MB over the "
                f"imports ({rows[-1]['anon_rss_mb']:.0f} MB anonymous at the end), {rows[-1]['blocks_read']} blocks read")
        rows.append(_loader_row(model, cache, root, args.device))
    for r in rows:
        r["bench"] = "data"
        r["name"] = " ".join(str(x) for x in (r["case"], r.get("model") or "",
                                                f"{r['workers']} workers" if "workers" in r else "",
                                                f"{r['dataset_mb']:.0f} MB" if "dataset_mb" in r else "") if x)
    return rows


def _loader_row(model: str, cache: str, root: str, device: str) -> dict:
    import torch

    from adpo_train.cli import build_parser, resolve
    from adpo_train.data import CachedPairDataset, PairBatchSampler, collate_cached
    from adpo_train.trainer import train

    ds = CachedPairDataset(cache)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PairBatchSampler(len(ds), 4, 0), collate_fn=collate_cached)
    t, n = time.time(), 0
    for _ in range(3):
        for b in loader:
            n += b["num_pairs"]
    loader_rate = n / (time.time() - t)
    out = os.path.join(root, "run")
    steps = 8
    train(resolve(build_parser().parse_args(
        ["--pretrained_model_name_or_path", model, "--latent_cache", cache, "--output_dir", out,
         "--train_batch_size", "4", "--max_train_steps", str(steps), "--logging_steps", str(steps // 2), "--quiet",
         "--no_plot", "--report_to", "jsonl", "--checkpointing_steps", "1000"]
        + (["--cpu_threads", str(torch.get_num_threads())] if device == "cpu" else []))))
    last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    return {"case": "loader", "model": "toy", "num_pairs": len(ds), "loader_pairs_per_s": loader_rate,
            "step_pairs_per_s": last["steps_per_s"] * 4}
