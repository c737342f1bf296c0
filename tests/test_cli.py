from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from intrinsic_retrieval.cli import main, read_corpus

ROOT = Path(__file__).resolve().parents[1]


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    rows = [
        {
            "_id": "a",
            "title": "Tides",
            "text": "Ocean tides follow the moon.",
            "metadata": {"y": 1},
        },
        {"_id": "b", "text": "Glaciers are slow rivers of ice.", "metadata": {"y": 2}},
        {"_id": "c", "text": "The moon orbits the earth every 27 days.", "metadata": {"y": 3}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_index_search_info_roundtrip(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    store = tmp_path / "store"
    assert main(["index", str(corpus), "--store", str(store), "--retriever", "bm25"]) == 0
    assert "indexed 3 new documents" in capsys.readouterr().out
    # resumable: a second run adds nothing
    assert main(["index", str(corpus), "--store", str(store)]) == 0
    assert "indexed 0 new documents (3 already present)" in capsys.readouterr().out

    assert main(["search", "moon", "--store", str(store), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]
    assert {h["document_id"] for h in hits} == {"a", "c"}
    assert hits[0]["rank"] == 1

    assert main(["search", "moon", "--store", str(store), "--filter", '{"y": 3}', "--json"]) == 0
    assert [h["document_id"] for h in json.loads(capsys.readouterr().out)[0]] == ["c"]

    assert main(["info", "--store", str(store), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chunks"] == 3 and info["retriever"] == "bm25" and info["verified"]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["search", "x", "--store", str(tmp_path / "missing")]) == 2
    assert "StoreNotFoundError" in capsys.readouterr().err
    corpus = _corpus(tmp_path)
    main(["index", str(corpus), "--store", str(tmp_path / "s")])
    capsys.readouterr()
    assert main(["search", " ", "--store", str(tmp_path / "s")]) == 2
    assert "EmptyQueryError" in capsys.readouterr().err


def test_eval_writes_json_and_table(scifact_path, tmp_path):
    out = tmp_path / "res.json"
    cmd = [
        sys.executable,
        "-m",
        "intrinsic_retrieval.cli",
        "eval",
        "--dataset",
        str(scifact_path),
        "--retriever",
        "bm25",
        "--subset",
        "300",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert "nDCG@10" in proc.stdout and "bm25" in proc.stdout
    payload = json.loads(out.read_text())
    (res,) = payload["results"]
    assert res["num_queries"] == 300 and res["num_docs"] == 300
    assert 0.5 < res["metrics"]["nDCG@10"] <= 1.0
    assert payload["machine"]["cores"]


def test_read_corpus_directory(tmp_path):
    (tmp_path / "a.md").write_text("# Title\nbody")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("text")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    docs = read_corpus(tmp_path)
    assert [d.id for d in docs] == ["a.md", "sub/b.txt"]


@pytest.mark.slow
def test_demo_runs(capsys):
    args = ["demo", "--retriever", "bm25,dense", "--docs", "60", "--queries", "5"]
    assert main([*args, "--train-queries", "5", "--quiet"]) == 0
    assert "query:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content",
    [b'{"_id": "a", "text": "caf\xe9"}\n', b'{"_id": "a", "text": \n', b"[1, 2]\n"],
    ids=["bad-utf8", "bad-json", "not-an-object"],
)
def test_index_bad_jsonl_is_one_line_typed_error(tmp_path, capsys, content):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b'{"_id": "ok", "text": "fine"}\n' + content)
    rc = main(["index", str(corpus), "--store", str(tmp_path / "s"), "--retriever", "bm25"])
    err = capsys.readouterr().err
    assert rc == 2 and "InvalidInputError" in err and "bad.jsonl:2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # the corpus is read in full before any store exists


def test_search_filter_not_json_is_typed_error(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["index", str(_corpus(tmp_path)), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["search", "moon", "--store", str(store), "--filter", "not json"]) == 2
    err = capsys.readouterr().err
    assert "InvalidFilterError" in err and "Traceback" not in err
