"""Scale-out: store parts combined into one store, indexing on a local Ray cluster started here,
search over parts held by Ray actors (intrinsic_retrieval.distributed)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.decoder import save_causal_lm
from support.intra import save as save_intra_model
from support.models import save as save_model
from support.models import tiny_bert

from intrinsic_retrieval import Document, create_retriever, load_retriever
from intrinsic_retrieval.distributed import (
    DistributedRetriever,
    PartsError,
    combine,
    index_distributed,
    merge_top_k,
    parts_dir,
    split_ranges,
)
from intrinsic_retrieval.errors import (
    ConcurrentWriteError,
    InvalidInputError,
    ModelMismatchError,
)
from intrinsic_retrieval.store import EncodedChunkStore

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [
    "protein",
    "gene",
    "cell",
    "blood",
    "risk",
    "vitamin",
    "fox",
    "dog",
    "planet",
    "magma",
    "insulin",
    "light",
    "energy",
]
DOCS = [
    Document(
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 9)) + f" item {i}",
        f"d{i}",
        {"tier": i % 3},
    )
    for i in range(23)
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "dense": str(save_model(tiny_bert(), root, "bert")),
        "incontext": save_causal_lm(root, "llama", 0),
        "intra": save_intra_model("t5", root),
    }


def _options(kind: str, models: dict[str, str]) -> dict:
    if kind == "bm25":
        return {}
    if kind == "incontext":
        return {"model": models["incontext"], "max_doc_tokens": 64, "chunk_size": 16}
    return {"model": models[kind], "chunk_size": 16, "chunk_overlap": 0}


def _single(kind: str, models: dict[str, str], path: Path):
    r = create_retriever(kind, path=str(path), show_progress=False, **_options(kind, models))
    r.add(DOCS)
    return r


def assert_same_rows(a: Path, b: Path) -> None:
    """Row for row: the same chunks (ids, texts, metadata, offsets) and the same tensors."""
    with (
        EncodedChunkStore.open(a, read_only=True) as x,
        EncodedChunkStore.open(b, read_only=True) as y,
    ):
        assert x.fingerprint == y.fingerprint and x.specs == y.specs and x.config == y.config
        assert x.num_rows == y.num_rows
        rows = list(range(x.num_rows))
        assert x.get(rows) == y.get(rows)
        for name, spec in x.specs.items():
            if spec.kind == "fixed":
                torch.testing.assert_close(x.fixed(name)[rows], y.fixed(name)[rows])
            else:
                for u, v in zip(x.varlen(name, rows), y.varlen(name, rows), strict=True):
                    torch.testing.assert_close(u.float(), v.float(), atol=2e-3, rtol=2e-3)


def _parts_by_hand(kind: str, models: dict[str, str], root: Path, n: int) -> list[Path]:
    """Parts as workers write them (the row offset told), without Ray."""
    paths = []
    for i, rng in enumerate(split_ranges(len(DOCS), n)):
        path = root / f"part-{i}"
        r = create_retriever(kind, path=str(path), show_progress=False, **_options(kind, models))
        r.set_row_offset(sum(len(r.chunker.split(d)) for d in DOCS[: rng.start]))
        r.add([DOCS[j] for j in rng])
        r.close()
        paths.append(path)
    return paths


def test_split_ranges_are_contiguous_and_balanced() -> None:
    for n, parts in [(23, 4), (5, 8), (1, 1), (100, 7)]:
        ranges = split_ranges(n, parts)
        assert [i for r in ranges for i in r] == list(range(n))
        sizes = [len(r) for r in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("kind", ["bm25", "dense", "incontext", "intra"])
def test_combined_parts_equal_a_single_store(kind: str, models, tmp_path: Path) -> None:
    single = _single(kind, models, tmp_path / "single")
    single.close()
    parts = _parts_by_hand(kind, models, tmp_path / "parts", 3)
    combine(parts, tmp_path / "combined")
    assert_same_rows(tmp_path / "single", tmp_path / "combined")
    r = load_retriever(tmp_path / "combined", show_progress=False)
    s = load_retriever(tmp_path / "single", show_progress=False)
    for q in ("protein gene", "fox dog planet"):
        assert [(h.chunk_id, round(h.score, 4)) for h in r.search(q, k=5)] == [
            (h.chunk_id, round(h.score, 4)) for h in s.search(q, k=5)
        ]


def test_combine_refusals_and_atomicity(models, tmp_path: Path, monkeypatch) -> None:
    parts = _parts_by_hand("bm25", models, tmp_path / "parts", 2)
    # a part made by another model (another analyser: another fingerprint)
    other = create_retriever(
        "bm25", path=str(tmp_path / "other"), stemmer=None, show_progress=False
    )
    other.add(DOCS[:3])
    other.close()
    with pytest.raises(ModelMismatchError):
        combine([parts[0], tmp_path / "other"], tmp_path / "c1")
    # the same model, another configuration
    k1 = create_retriever("bm25", path=str(tmp_path / "k1"), k1=1.5, show_progress=False)
    k1.add(DOCS[:3])
    k1.close()
    with pytest.raises(PartsError, match="configuration"):
        combine([parts[0], tmp_path / "k1"], tmp_path / "c2")
    # a combiner that fails half-way leaves no store and no temporary behind
    from intrinsic_retrieval.distributed import parts as parts_mod

    calls = []

    def boom(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(src, dst)

    original = parts_mod._copy_rows
    monkeypatch.setattr(parts_mod, "_copy_rows", boom)
    with pytest.raises(PartsError, match="disk full"):
        combine(parts, tmp_path / "c3")
    monkeypatch.undo()
    assert not (tmp_path / "c3").exists()
    assert not list(tmp_path.glob(".c3.combining-*"))
    # a killed combiner's leftovers are cleared by the next one, which succeeds
    (tmp_path / ".c3.combining-dead").mkdir()
    combine(parts, tmp_path / "c3")
    assert not list(tmp_path.glob(".c3.combining-*"))
    with pytest.raises(PartsError, match="exists"):
        combine(parts, tmp_path / "c3")
    with pytest.raises(PartsError, match="no store parts"):
        combine(tmp_path / "nowhere", tmp_path / "c4")


def test_two_combiners_at_once(models, tmp_path: Path) -> None:
    """Another process holds the combiner's lock: the second combiner is refused, nothing is
    written, and once the first is gone combining works."""
    parts = _parts_by_hand("bm25", models, tmp_path / "parts", 2)
    lock_dir = tmp_path / "parts"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConcurrentWriteError):
            combine(parts, tmp_path / "c", lock_dir=lock_dir)
        assert not (tmp_path / "c").exists()
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(lock_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its process
    os.close(fd)
    combine(parts, tmp_path / "c", lock_dir=lock_dir)
    assert_same_rows(tmp_path / "c", tmp_path / "c")


def test_merge_top_k_orders_by_score_then_part() -> None:
    from intrinsic_retrieval.types import Hit

    a = [Hit("a1", "a", "", 0.9, 1), Hit("a2", "a", "", 0.5, 2)]
    b = [Hit("b1", "b", "", 0.7, 1), Hit("b2", "b", "", 0.5, 2)]
    got = merge_top_k([a, b], 3)
    assert [(h.chunk_id, h.rank) for h in got] == [("a1", 1), ("b1", 2), ("a2", 3)]


# ---------------------------------------------------------------- on a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
    )
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("kind", ["bm25", "dense", "incontext", "intra"])
def test_ray_indexing_equals_single_process(kind: str, models, ray_cluster, tmp_path: Path) -> None:
    _single(kind, models, tmp_path / "single").close()
    report = index_distributed(
        kind, DOCS, tmp_path / "idx", options=_options(kind, models), parts=2
    )
    assert report.parts == 2 and report.documents == len(DOCS) and report.parts_done_before == 0
    assert not parts_dir(tmp_path / "idx").exists()  # parts removed once combined
    assert_same_rows(tmp_path / "single", tmp_path / "idx")
    assert len(load_retriever(tmp_path / "idx", show_progress=False)) == report.chunks


def test_ray_indexing_resumes_and_refuses(models, ray_cluster, tmp_path: Path) -> None:
    opts = _options("dense", models)
    dest = tmp_path / "idx"
    root = parts_dir(dest)
    # first run: parts only, then part 1 loses its marker and half of its rows never happened
    # (what a worker killed after some commits leaves: its store is crash-safe)
    index_distributed("dense", DOCS, dest, options=opts, parts=2, combine_parts=False)
    (root / "part-00001.done.json").unlink()
    import shutil

    shutil.rmtree(root / "part-00001")
    half = create_retriever("dense", path=str(root / "part-00001"), show_progress=False, **opts)
    half.add(DOCS[12:17])
    half.close()
    report = index_distributed("dense", DOCS, dest, options=opts)  # parts: from the plan
    assert report.parts_done_before == 1
    _single("dense", models, tmp_path / "single").close()
    assert_same_rows(tmp_path / "single", dest)
    # a re-run over another corpus is refused, not mixed in
    index_distributed("dense", DOCS, tmp_path / "b", options=opts, parts=2, combine_parts=False)
    with pytest.raises(PartsError, match="another corpus"):
        index_distributed("dense", DOCS[:-1], tmp_path / "b", options=opts, parts=2)
    with pytest.raises(PartsError, match="already an index"):
        index_distributed("dense", DOCS, dest, options=opts, parts=2)
    # a part written by another model: the worker's typed error comes back as itself
    bad = tmp_path / "c"
    other = create_retriever("bm25", path=str(parts_dir(bad) / "part-00000"), stemmer=None,
                             show_progress=False)  # fmt: skip
    other.close()
    with pytest.raises(ModelMismatchError):
        index_distributed("bm25", DOCS, bad, parts=2)
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        index_distributed("nope", DOCS, tmp_path / "d")


def _same_hits(got: list, want: list) -> None:
    """The same scores rank by rank and the same chunks; chunks of equal score (this corpus
    repeats texts) may come in either order, as they may within one store."""
    assert [h.rank for h in got] == list(range(1, len(want) + 1))
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    groups: list[list[int]] = []  # positions of equal scores in `want`
    for i, h in enumerate(want):
        if groups and abs(h.score - want[groups[-1][-1]].score) <= 1e-5:
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups[:-1]:  # the last group may be cut at k differently
        assert {got[i].chunk_id for i in g} == {want[i].chunk_id for i in g}


def test_errors_cross_process_boundaries_intact() -> None:
    """A worker's typed error reaches the driver as itself: Ray pickles it in transit, and
    `copy.deepcopy` takes the same `__reduce__` path."""
    import copy

    from intrinsic_retrieval.distributed import PartFailedError
    from intrinsic_retrieval.errors import (
        DuplicateIdError,
        StageMismatchError,
        StoreCorruptedError,
        StorePermissionError,
        UnknownIdError,
    )

    for err in (
        ModelMismatchError("p", "a" * 20, "b" * 20),
        DuplicateIdError(["x"], where="batch"),
        StoreCorruptedError("f", "bad"),
        StorePermissionError("/x/meta.sqlite", "read"),  # an OSError: its message is kept
        UnknownIdError("rows not in store: [3]"),  # a KeyError
        StageMismatchError("stages disagree", ["a"]),
        PartFailedError({"part-00000": "boom"}),
        InvalidInputError("plain"),
    ):
        back = copy.deepcopy(err)
        assert type(back) is type(err) and str(back) == str(err)
        assert vars(back) == vars(err)
    assert "permission denied" in str(StorePermissionError("/x", "read"))


def test_bm25_scores_from_shared_statistics_equal_its_own(tmp_path: Path) -> None:
    """One store scored through the statistics path (its own statistics) ranks as bm25s does;
    parts scored with the summed statistics rank as the whole store does."""
    from intrinsic_retrieval.retrievers.bm25 import BM25Retriever

    single = _single("bm25", {}, tmp_path / "single")
    queries = ["protein gene", "fox dog planet item 3", "insulin blood risk"]
    own = single.corpus_statistics(queries)
    assert own["rows"] == single.store.num_rows
    for flt in (None, {"tier": 2}):
        for g, w in zip(
            single.search_batch(queries, k=9, filter=flt, statistics=own),
            single.search_batch(queries, k=9, filter=flt),
            strict=True,
        ):
            _same_hits(g, w)
            assert [h.score for h in g] == [h.score for h in w]  # bm25s's arithmetic, bit for bit
    parts = [
        load_retriever(p, show_progress=False)
        for p in _parts_by_hand("bm25", {}, tmp_path / "parts", 3)
    ]
    stats = BM25Retriever.merge_statistics([p.corpus_statistics(queries) for p in parts])
    assert stats == own
    per_part = [p.search_batch(queries, k=9, statistics=stats) for p in parts]
    for i, want in enumerate(single.search_batch(queries, k=9)):
        _same_hits(merge_top_k([pp[i] for pp in per_part], 9), want)
    with pytest.raises(InvalidInputError, match="document frequency"):
        parts[0].search_batch(["cell energy"], k=3, statistics=stats)  # not computed for it
    l_store = create_retriever(
        "bm25", path=str(tmp_path / "l"), method="bm25l", show_progress=False
    )
    l_store.add(DOCS[:4])
    with pytest.raises(InvalidInputError, match="bm25l"):
        l_store.search_batch(["protein"], k=2, statistics=l_store.corpus_statistics(["protein"]))


def test_refused_before_any_work(models, tmp_path: Path) -> None:
    """What cannot be built in parts, or has nowhere to go, is refused before Ray starts."""
    for name in ("generative", "rerank"):
        with pytest.raises(InvalidInputError, match="in parts"):
            index_distributed(name, DOCS, tmp_path / name)
    (tmp_path / "taken").mkdir()
    with pytest.raises(PartsError, match="not an index"):
        index_distributed("bm25", DOCS, tmp_path / "taken")
    assert not parts_dir(tmp_path / "taken").exists()


def test_combine_refuses_in_context_parts_that_repeat_codes(models, tmp_path: Path) -> None:
    """Parts built without their row offsets start their codes at 0 again: refused."""
    from intrinsic_retrieval.errors import StoreError

    paths = []
    for i, rng in enumerate(split_ranges(len(DOCS), 2)):
        r = create_retriever("incontext", path=str(tmp_path / f"p{i}"), show_progress=False,
                             **_options("incontext", models))  # fmt: skip
        r.add([DOCS[j] for j in rng])  # no set_row_offset
        r.close()
        paths.append(tmp_path / f"p{i}")
    with pytest.raises(StoreError, match="repeat document codes"):
        combine(paths, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_intra_phases_reproduce_its_own_search(models, tmp_path: Path) -> None:
    """INTRA's full pass split as distributed search runs it (C0 from the encoder stage, states
    by chunk id, one fold, scoring with the folded queries) ranks as `search` does."""
    r = _single("intra", models, tmp_path / "s")
    assert r.distributed_scoring() == "context"
    for q in ("protein gene", "fox dog planet"):
        with r.using(mode="encoder"):
            c0 = [h.chunk_id for h in r.search(q, k=r.k0)]
        folded = r.fold_query(q, r.context_states(c0))
        _same_hits(r.search_folded(folded, 6, None, c0), r.search(q, k=6))
    with r.using(mode="encoder"):
        assert r.distributed_scoring() == "local"


@pytest.mark.parametrize("kind", ["dense", "bm25", "intra"])
def test_distributed_search_equals_single_store(
    kind: str, models, ray_cluster, tmp_path: Path
) -> None:
    opts = _options(kind, models)
    single = _single(kind, models, tmp_path / "single")
    index_distributed(kind, DOCS, tmp_path / "idx", options=opts, parts=2, combine_parts=False)
    d = DistributedRetriever(parts_dir(tmp_path / "idx"), cpus_per_part=0.5)
    try:
        assert len(d) == len(single)
        queries = ["protein gene", "fox dog planet", "insulin blood risk"]
        for flt in (None, {"tier": 1}):
            got = d.search_batch(queries, k=7, filter=flt)
            want = single.search_batch(queries, k=7, filter=flt)
            for g, w in zip(got, want, strict=True):
                _same_hits(g, w)
        if kind == "intra":  # C0 = {} (k0=0) needs no proposals
            d0 = DistributedRetriever(parts_dir(tmp_path / "idx"), cpus_per_part=0.5, k0=0)
            try:
                with single.using(k0=0):
                    _same_hits(d0.search("protein gene", k=5), single.search("protein gene", k=5))
            finally:
                d0.close()
        if kind == "dense":  # saved parts reopen as the same distributed index
            d.save(tmp_path / "saved")
            again = DistributedRetriever.load(tmp_path / "saved", cpus_per_part=0.5)
            try:
                _same_hits(again.search("protein gene", k=5), d.search("protein gene", k=5))
            finally:
                again.close()
        assert d.delete(["d3"]) == single.delete(["d3"])
        assert "d3" not in {h.document_id for h in d.search("protein gene", k=23)}
        with pytest.raises(InvalidInputError):
            d.search("", k=3)
    finally:
        d.close()


def test_distributed_search_refusals(models, ray_cluster, tmp_path: Path) -> None:
    """In-context scores are attention over every block at once: not mergeable, refused. Parts
    of different options or models are refused too."""
    opts = _options("incontext", models)
    index_distributed("incontext", DOCS, tmp_path / "i", options=opts, parts=2, combine_parts=False)
    with pytest.raises(InvalidInputError, match="whole corpus"):
        DistributedRetriever(parts_dir(tmp_path / "i"), cpus_per_part=0.5)
    a = create_retriever("bm25", path=str(tmp_path / "a"), show_progress=False)
    a.add(DOCS[:5])
    b = create_retriever("bm25", path=str(tmp_path / "b"), k1=2.0, show_progress=False)
    b.add(DOCS[5:])
    c = create_retriever("bm25", path=str(tmp_path / "c"), stemmer=None, show_progress=False)
    c.add(DOCS[5:])
    for x in (a, b, c):
        x.close()
    with pytest.raises(PartsError, match="other options"):
        DistributedRetriever([tmp_path / "a", tmp_path / "b"], cpus_per_part=0.5)
    with pytest.raises(ModelMismatchError):
        DistributedRetriever([tmp_path / "a", tmp_path / "c"], cpus_per_part=0.5)


def test_cli_index_on_ray(ray_cluster, tmp_path: Path, capsys) -> None:
    """`index --ray --parts 2` builds the same store as a plain `index`; a second run into the
    same store is one error line, not a traceback."""
    import json

    from intrinsic_retrieval.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": d.id, "text": d.text, "metadata": d.metadata}) + "\n"
                for d in DOCS)
    )  # fmt: skip
    args = ["index", str(corpus), "--retriever", "bm25"]
    assert main([*args, "--store", str(tmp_path / "plain")]) == 0
    assert main([*args, "--store", str(tmp_path / "ray"), "--ray", "--parts", "2"]) == 0
    assert "2 parts" in capsys.readouterr().out
    assert_same_rows(tmp_path / "plain", tmp_path / "ray")
    assert main([*args, "--store", str(tmp_path / "ray"), "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already an index" in err[0]


def test_row_offsets_of_whole_documents_need_no_model() -> None:
    """In-context parts of whole documents (its default): one row per document before the
    part, counted without loading a model (the model path here does not exist)."""
    from intrinsic_retrieval.distributed.indexing import _row_offsets

    ranges = [DOCS[:5], DOCS[5:12], DOCS[12:]]
    opts = {"model": "/nonexistent", "chunk_size": None}
    assert _row_offsets("incontext", opts, ranges) == [0, 5, 12]
    assert _row_offsets("bm25", {}, ranges) == [0, 0, 0]  # nothing depends on the position


def _kill_a_worker_mid_part(root: Path, deadline: float) -> bool:
    """SIGKILL a Ray worker running `encode_part` once a part has committed rows but is not
    done; False if no such moment came."""
    import json
    import time

    import psutil

    while time.monotonic() < deadline:
        for i in range(2):
            manifest = root / f"part-{i:05d}" / "manifest.json"
            try:
                rows = json.loads(manifest.read_text())["num_rows"]
            except (OSError, ValueError, KeyError):
                continue
            if rows and not (root / f"part-{i:05d}.done.json").exists():
                for p in psutil.process_iter(["cmdline"]):
                    if "ray::encode_part" in " ".join(p.info["cmdline"] or []):
                        p.kill()
                        return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("retries", [0, 2])
def test_worker_killed_mid_part(retries: int, ray_cluster, tmp_path: Path) -> None:
    """A worker SIGKILLed after some commits: with retries, Ray reruns the task, which continues
    from the part's last commit; without, `PartFailedError` and a re-run resumes. Either way the
    store equals the single-process one."""
    import threading
    import time

    from intrinsic_retrieval.distributed import PartFailedError

    words = WORDS * 3
    docs = [Document(" ".join(words[(i + j) % len(words)] for j in range(12)) + f" n{i}", f"x{i}")
            for i in range(4000)]  # fmt: skip
    opts = {"index_batch_size": 16}
    dest = tmp_path / "idx"
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["report"] = index_distributed(
                "bm25", docs, dest, options=opts, parts=2, max_retries=retries
            )
        except Exception as exc:
            outcome["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    killed = _kill_a_worker_mid_part(parts_dir(dest), time.monotonic() + 120)
    driver.join(300)
    assert killed, "no worker was caught mid-part"
    if retries:
        assert "report" in outcome, outcome.get("error")
    else:
        assert isinstance(outcome.get("error"), PartFailedError)
        assert not dest.exists()
        report = index_distributed("bm25", docs, dest, options=opts, parts=2)
        assert report.parts_done_before <= 1
    single = create_retriever("bm25", path=str(tmp_path / "single"), show_progress=False, **opts)
    single.add(docs)
    single.close()
    assert_same_rows(tmp_path / "single", dest)
