"""A Pick-a-Pic-schema dataset read in place, a block (row group / record batch) at a time.

Nothing here holds the dataset: :func:`open_source` lists its blocks from file metadata, the
index of kept pairs is built from the ``label_0`` column alone (one block at a time), and the
image bytes of a pair are read on demand with the rest of their block (parquet: buffered reads;
arrow: memory-mapped, the map closed with the file's last cached block) into a small bounded LRU
(:class:`BlockReader`, ``BLOCK_CACHE`` blocks per process).  Peak memory is
therefore ``BLOCK_CACHE`` blocks plus the index (a few int64 per row), whatever the dataset's
size.

Layouts accepted as ``--dataset_name``: a ``.parquet`` or ``.arrow`` file; a folder of them
(searched recursively; files of the split are those in a folder named after it or named
``<split>-*`` / ``<split>.*``, as a hub download leaves ``data/train-00000-of-00012.parquet``;
if no file matches, all of them); a ``datasets.save_to_disk`` folder (its ``state.json``
lists the arrow shards; a ``DatasetDict``'s ``dataset_dict.json`` names the splits).

Schema: ``jpg_0``, ``jpg_1`` (binary, or ``datasets``' Image struct ``{bytes, path}``),
``label_0`` (numeric), ``caption`` (string).  Any other type, an unreadable file or a missing
column is a one-line :class:`UserError` naming the file.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Optional

import numpy as np

from .errors import MissingInput, UserError

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
BLOCK_CACHE = 4  # blocks per process; also the block-aware shuffle's window (see data.PairBatchSampler)


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _split_files(path: str, split: str) -> list[str]:
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.endswith((".parquet", ".arrow")))
    pat = re.compile(rf"^{re.escape(split)}[-.]")
    in_split = [f for f in files if split in os.path.relpath(f, path).split(os.sep)[:-1]
                or pat.match(os.path.basename(f))]
    return in_split or files


def _save_to_disk_files(path: str, split: str) -> Optional[list[str]]:
    """The arrow shards of a ``datasets.save_to_disk`` folder, or None if ``path`` is not one."""
    dd = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dd):
        with open(dd) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise UserError(f"--dataset_split_name: {split!r} not in {splits}")
        path = os.path.join(path, split)
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as f:
        st = json.load(f)
    if st.get("_indices_data_files"):
        raise UserError(f"--dataset_name {path!r}: a datasets folder saved with an indices mapping; save it "
                        f"with `ds.flatten_indices().save_to_disk(...)` first")
    return [os.path.join(path, d["filename"]) for d in st.get("_data_files", [])]


def dataset_files(path: str, split: str = "train") -> list[str]:
    """The parquet/arrow files of ``split`` at ``path`` (see the module docstring for the layouts)."""
    if not os.path.exists(path):
        raise MissingInput(f"--dataset_name: {path!r} does not exist (local parquet/arrow files or a "
                           f"datasets.save_to_disk folder are expected; nothing is downloaded)")
    if os.path.isfile(path):
        return [path]
    files = _save_to_disk_files(path, split)
    if files is None:
        files = _split_files(path, split)
    if not files:
        raise MissingInput(f"--dataset_name: no .parquet or .arrow files under {path!r}")
    return files


class _File:
    """One file's blocks: parquet row groups, or arrow IPC record batches (zero-copy from the map)."""

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            if path.endswith(".parquet"):
                # buffered reads, not a memory map: a mapped file's touched pages count in the process's
                # RSS until it is closed (measured: peak RSS grew with the dataset); a read row group is
                # anonymous memory, freed when the LRU drops it
                self.pq = pq.ParquetFile(path, memory_map=False)
                self.schema = self.pq.schema_arrow
                self.block_rows = [self.pq.metadata.row_group(i).num_rows for i in range(self.pq.num_row_groups)]
            else:
                self.pq = None
                src = pa.memory_map(path)
                try:
                    rd = pa.ipc.open_file(src)
                    self.batches = [rd.get_batch(i) for i in range(rd.num_record_batches)]
                except pa.ArrowInvalid:
                    src.seek(0)
                    self.batches = list(pa.ipc.open_stream(src))  # buffers point into the map: nothing copied
                    rd = None
                self.schema = rd.schema if rd is not None else (self.batches[0].schema if self.batches else
                                                                pa.ipc.open_stream(pa.memory_map(path)).schema)
                self.block_rows = [b.num_rows for b in self.batches]
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, thrift errors...
            raise UserError(f"--dataset_name: cannot read {path!r}: {_reason(exc)}") from None

    def read(self, block: int, columns: list[str]):
        if self.pq is not None:
            return self.pq.read_row_group(block, columns=columns)
        import pyarrow as pa

        return pa.Table.from_batches([self.batches[block].select(columns)])


def check_schema(path: str, schema) -> None:
    """One-line :class:`UserError` unless ``schema`` has the Pick-a-Pic columns with usable types."""
    import pyarrow as pa

    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise UserError(f"--dataset_name {path!r}: missing Pick-a-Pic columns {missing} (has {names})")
    t = {c: schema.field(c).type for c in REQUIRED_COLUMNS}
    if not (pa.types.is_string(t["caption"]) or pa.types.is_large_string(t["caption"])):
        raise UserError(f"--dataset_name {path!r}: column 'caption' has type {t['caption']}, expected string "
                        f"(utf-8 text)")
    if not (pa.types.is_integer(t["label_0"]) or pa.types.is_floating(t["label_0"])):
        raise UserError(f"--dataset_name {path!r}: column 'label_0' has type {t['label_0']}, expected a number")
    for c in ("jpg_0", "jpg_1"):
        if not (pa.types.is_binary(t[c]) or pa.types.is_large_binary(t[c]) or pa.types.is_struct(t[c])):
            raise UserError(f"--dataset_name {path!r}: column {c!r} has type {t[c]}, expected encoded image bytes")


class BlockReader:
    """Blocks of a dataset's files, read on demand into an LRU of ``capacity`` blocks.

    Picklable (DataLoader workers): the open files and the LRU are per process and rebuilt lazily.
    """

    def __init__(self, files: list[str], capacity: int = BLOCK_CACHE):
        self.files, self.capacity = list(files), capacity
        self._open: dict[int, _File] = {}
        self._lru: collections.OrderedDict = collections.OrderedDict()
        self.blocks_read = 0  # how many times a block was (re)read: the shuffle's locality, measured

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_lru"] = {}, collections.OrderedDict()
        return state

    def file(self, f: int) -> _File:
        if f not in self._open:
            self._open[f] = _File(self.files[f])
        return self._open[f]

    def block(self, f: int, b: int, columns: tuple):
        key = (f, b, columns)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        table = self.file(f).read(b, list(columns))
        self.blocks_read += 1
        self._lru[key] = table
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        live = {k[0] for k in self._lru}
        for g in [g for g in self._open if g not in live]:  # an arrow file's map goes with its last block
            del self._open[g]
        return table

    def clear(self) -> None:
        self._lru.clear()


def scan_labels(files: list[str]) -> dict:
    """The label index of a dataset: per row (in file, block order) its file, block, row in block and
    ``label_0`` (float64), read one block at a time from that column alone; schemas are checked first."""
    reader = BlockReader(files, capacity=1)
    parts = {"file": [], "block": [], "row": [], "label": []}
    for fi, path in enumerate(files):
        f = reader.file(fi)
        check_schema(path, f.schema)
        for b, n in enumerate(f.block_rows):
            try:
                col = f.read(b, ["label_0"]).column("label_0")
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"--dataset_name: cannot read {path!r} (block {b}): {_reason(exc)}") from None
            parts["label"].append(col.to_numpy(zero_copy_only=False).astype(np.float64))
            parts["file"].append(np.full(n, fi, np.int32))
            parts["block"].append(np.full(n, b, np.int32))
            parts["row"].append(np.arange(n, dtype=np.int32))
    return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}


def distinct_captions(path: str, split: str = "train") -> list[str]:
    """The distinct captions of a Pick-a-Pic-schema dataset, in order of first appearance, read from the
    ``caption`` column alone (one block at a time).  Null captions are read as ``""``."""
    files = dataset_files(path, split)
    reader, seen = BlockReader(files, capacity=1), {}
    for fi, p in enumerate(files):
        f = reader.file(fi)
        check_schema(p, f.schema)
        for b in range(len(f.block_rows)):
            for c in f.read(b, ["caption"]).column("caption").to_pylist():
                seen.setdefault(c or "", None)
    return list(seen)
