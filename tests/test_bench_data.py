"""bench/data.py: the computed bytes per pair, and the peak-RSS rows it measures (flat in the dataset's size)."""
import pytest

from bench.data import _rss_row, bytes_per_pair, computed_rows, write_blob_parquet

pytest.importorskip("pyarrow")


def test_computed_bytes_per_pair_from_the_shapes():
    rows = {r["model"]: r["bytes_per_pair"] for r in computed_rows(16.0)}
    # SD1.5 at 512: two 4x64x64 bf16 latents + 25 bytes of ids and flip, + a 77x768 text per 16 pairs
    assert rows["sd15-512"] == 2 * 4 * 64 * 64 * 2 + 25 + 77 * 768 * 2 / 16
    # SDXL at 1024: 4x128x128 latents, 2x6 fp32 time ids, 77x2048 text + 1280 pooled per caption
    assert rows["sdxl-1024"] == 2 * 4 * 128 * 128 * 2 + 25 + 48 + (77 * 2048 + 1280) * 2 / 16
    assert bytes_per_pair((4, 8, 8), (77, 768), 0, 2, 1.0, False) > bytes_per_pair((4, 8, 8), (77, 768), 0, 2, 8.0,
                                                                                 False)


def test_peak_rss_of_a_full_pass_does_not_grow_with_the_dataset(tmp_path):
    """Read every pair of a 16 MB and a 64 MB folder in the block-aware order: the peak over the imports
    grows by less than half the 48 MB between them (a memory-mapped parquet grew by all of it; what
    does grow is the index and the files' metadata, measured 4-18 MB here)."""
    small, large = (_rss_row(write_blob_parquet(str(tmp_path / f"d{mb}"), mb)) for mb in (16, 64))
    assert large["num_pairs"] == 4 * small["num_pairs"] and large["blocks_read"] == 4 * small["blocks_read"]
    assert large["dataset_mb"] > 60
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 0.5 * (large["dataset_mb"] - small["dataset_mb"]), (small, large)
