"""Pick-a-Pic schema: ties, winner-first order, corrupt images, sources, seeded flips."""
import io
import json

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("PIL")

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png(color, size=8):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _table(n=10):
    """Row i: the red image is preferred; it sits in slot i % 2. Row 3 is a tie, row 6 has a corrupt image."""
    cols = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": [], "user_id": []}
    for i in range(n):
        red_first = i % 2 == 0
        cols["jpg_0"].append(_png(RED) if red_first else _png(BLUE))
        cols["jpg_1"].append(_png(BLUE) if red_first else _png(RED))
        cols["label_0"].append(1.0 if red_first else 0.0)
        cols["caption"].append(f"pair {i}")
        cols["user_id"].append(i)
    cols["label_0"][3] = 0.5
    cols["jpg_1"][6] = b"\xff\xd8 truncated jpeg"
    return pa.table(cols)


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "train-00000.parquet"
    pq.write_table(_table(), path)
    return str(path)


def _is_red(t):  # (3, R, R) in [-1, 1]
    return bool(t[0].mean() > 0.9 and t[2].mean() < -0.9)


def test_ties_dropped_winner_first_corrupt_counted(parquet):
    from adpo_train.data import ImagePairDataset, PickAPicPairs, collate_images
    from adpo_train.models import load_encoders
    from tests.test_train_fixtures import toy_assets

    pairs = PickAPicPairs(parquet)
    assert pairs.num_rows == 10 and pairs.num_ties == 1 and len(pairs) == 9
    assert 3 not in pairs.rows.tolist()
    _, _, tok = load_encoders(toy_assets()["model"])
    ds = ImagePairDataset(pairs, tok, resolution=4)
    items = [ds[i] for i in range(len(ds))]
    corrupt = [it for it in items if it["pixels"] is None]
    assert [int(pairs.rows[it["index"]]) for it in corrupt] == [6]
    for it in items:
        if it["pixels"] is not None:
            assert _is_red(it["pixels"][0]) and not _is_red(it["pixels"][1])
    batch = collate_images(items)
    assert batch["num_corrupt"] == 1 and batch["num_pairs"] == 8 and batch["pixels"].shape == (8, 2, 3, 4, 4)


def test_flips_are_exactly_the_recorded_pairs(parquet):
    from adpo_train.data import PickAPicPairs, decode_image

    pairs = PickAPicPairs(parquet, flip_ratio=0.4, flip_seed=7)
    rec = pairs.flip_record()
    assert len(rec["flipped_pairs"]) == round(0.4 * 9)
    assert rec == PickAPicPairs(parquet, flip_ratio=0.4, flip_seed=7).flip_record()  # seeded
    assert rec != PickAPicPairs(parquet, flip_ratio=0.4, flip_seed=8).flip_record()
    for i in range(len(pairs)):
        w = decode_image(pairs.raw(i)["winner"], 4)
        if w is None:
            continue
        assert _is_red(w) == (i not in rec["flipped_pairs"]), i
    assert rec["flipped_rows"] == [int(pairs.rows[i]) for i in rec["flipped_pairs"]]


def test_cache_counts_and_records_flips(parquet, tmp_path):
    from adpo_train.cache import build_cache
    from adpo_train.data import CachedPairDataset, PickAPicPairs
    from tests.test_train_fixtures import toy_assets

    meta = build_cache(toy_assets()["model"], parquet, str(tmp_path / "cache"), resolution=32, batch_size=4,
                       shard_size=4, flip_ratio=0.4, flip_seed=7, device="cpu", log=lambda *a: None)
    assert (meta["num_ties"], meta["num_corrupt"], meta["num_pairs"]) == (1, 1, 8)
    # a shard covers a fixed range of 4 kept pairs (a resumable unit); the corrupt pair leaves its shard with 3
    assert [s["num_pairs"] for s in meta["shards"]] == [4, 3, 1]
    pairs = PickAPicPairs(parquet, flip_ratio=0.4, flip_seed=7)
    flipped_rows = set(pairs.flip_record()["flipped_rows"]) - {6}
    assert set(meta["flipped_rows"]) == flipped_rows
    ds = CachedPairDataset(str(tmp_path / "cache"))
    assert len(ds) == 8
    got = {i for i in range(len(ds)) if ds[i]["flipped"]}
    assert got == set(meta["flipped_pairs"])
    item = ds[5]
    assert item["latents"].shape == (2, 4, 16, 16) and item["text"].shape == (16, 32)
    assert json.load(open(tmp_path / "cache" / "index.json"))["format"].startswith("adpo-train latent cache")


def test_arrow_and_load_from_disk_sources(parquet, tmp_path):
    from adpo_train.data import PickAPicPairs

    table = _table()
    arrow = tmp_path / "data.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert len(PickAPicPairs(str(arrow))) == 9
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset(table)})
    d.save_to_disk(str(tmp_path / "saved"))
    p = PickAPicPairs(str(tmp_path / "saved"), split="train")
    assert len(p) == 9 and p.num_ties == 1
    with pytest.raises(ValueError, match="missing Pick-a-Pic columns"):
        bad = tmp_path / "bad.parquet"
        pq.write_table(pa.table({"x": [1]}), bad)
        PickAPicPairs(str(bad))


def test_batch_order_is_a_function_of_seed_and_epoch():
    from adpo_train.data import PairBatchSampler

    s = PairBatchSampler(10, 3, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=1)
    assert list(s) == full[1:] and len(full) == 3
    two = [PairBatchSampler(10, 2, seed=1, rank=r, world=2) for r in range(2)]
    for x in two:
        x.set_epoch(2)
    merged = [a + b for a, b in zip(*[list(x) for x in two])]
    assert sorted(sum(merged, [])) == sorted(set(sum(merged, [])))
    assert torch.equal(torch.tensor(np.array(merged).shape), torch.tensor([2, 4]))


def test_flip_and_random_crop_apply_to_both_images_of_a_pair():
    """diffusers' default horizontal flip and --random_crop: one seeded draw per pair, shared by winner
    and loser; the flip mirrors the centre crop exactly; crops move within the free room."""
    import io

    import numpy as np
    from PIL import Image

    from adpo_train.data import decode_image, pair_augmentation

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)  # wider than tall: room to crop sideways
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    png = buf.getvalue()
    centre = decode_image(png, 32)
    assert torch.equal(decode_image(png, 32, flip=True), centre.flip(-1))
    augs = [pair_augmentation(0, i, hflip=True, random_crop=True) for i in range(64)]
    assert augs == [pair_augmentation(0, i, True, True) for i in range(64)]  # a function of (seed, pair)
    assert 16 < sum(a["flip"] for a in augs) < 48
    lefts = {decode_image(png, 32, with_meta=True, crop=a["crop"])[1][1][1] for a in augs}
    assert len(lefts) > 3 and min(lefts) >= 0 and max(lefts) <= 38 - 32  # 40x48 -> 32x38 (shorter side 32)
    assert pair_augmentation(0, 5, hflip=False, random_crop=False) == {"flip": False, "crop": None}
