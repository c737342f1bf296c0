"""Build an index, save it through both adapters, reload it in a new process, and check that the
ranked ids and scores are identical.

Run:  python examples/persist_and_reload.py                  # bm25, dense, intra if available
      python examples/persist_and_reload.py --retriever bm25 --out /tmp/indexes
Exits non-zero if any reloaded result differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from intrinsic_retrieval import ModelLoadError, NotTrainedError, available

TEXTS = [
    "Photosynthesis converts light energy into chemical energy in chloroplasts.",
    "Insulin is a hormone that lowers blood glucose by helping cells absorb it.",
    "Volcanic eruptions release ash and sulfur dioxide that can cool the climate.",
    "Jupiter is the largest planet in the solar system, a gas giant with many moons.",
    "Overuse of antibiotics lets resistant bacteria survive and spread.",
    "Glaciers retreat as global temperatures rise and ice sheets thin.",
]
IDS = ["photosynthesis", "insulin", "volcano", "jupiter", "antibiotics", "glaciers"]
QUERIES = ["plants and sunlight", "blood sugar hormone", "largest planet", "melting ice"]
K = 4

DEFAULT_RETRIEVERS = ("bm25", "dense", "intra")
OPTIONAL = {"intra"}

Ranked = list[list[tuple[str, float]]]


def langchain_results(path: Path | None = None, retriever=None) -> Ranked:
    from langchain_intrinsic_retrieval import IntrinsicRetriever

    r = retriever or IntrinsicRetriever.load(path, retriever_overrides={"show_progress": False})
    return [[(d.id, d.metadata["score"]) for d in r.invoke(q)] for q in QUERIES]


def llamaindex_results(path: Path | None = None, retriever=None) -> Ranked:
    from llama_index.retrievers.intrinsic import IntrinsicRetriever

    r = retriever or IntrinsicRetriever.from_persist_dir(
        path, retriever_overrides={"show_progress": False}
    )
    return [[(n.node.node_id, n.score) for n in r.retrieve(q)] for q in QUERIES]


LOADERS = {"langchain": langchain_results, "llamaindex": llamaindex_results}


def reload_in_new_process(paths: dict[str, Path]) -> dict[str, Ranked]:
    """Reload every saved index in one fresh interpreter; returns its results per key."""
    spec = json.dumps({key: str(p) for key, p in paths.items()})
    out = subprocess.run(
        [sys.executable, __file__, "--reload", spec], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {key: [[(i, s) for i, s in q] for q in ranked] for key, ranked in got.items()}


def build_and_save(name: str, out: Path) -> tuple[dict[str, Ranked], dict[str, Path]]:
    """Results before saving and where each adapter saved, keyed ``"<name>/<framework>"``."""
    from langchain_intrinsic_retrieval import IntrinsicRetriever as LCRetriever
    from llama_index.retrievers.intrinsic import IntrinsicRetriever as LIRetriever

    lc = LCRetriever.from_texts(
        TEXTS, ids=IDS, retriever=name, retriever_kwargs={"show_progress": False}, k=K
    )
    li = LIRetriever(lc.retriever, similarity_top_k=K)
    before: dict[str, Ranked] = {}
    paths: dict[str, Path] = {}
    for framework, adapter, save in (("langchain", lc, lc.save), ("llamaindex", li, li.persist)):
        key = f"{name}/{framework}"
        before[key] = LOADERS[framework](retriever=adapter)
        paths[key] = out / f"{name}-{framework}"
        save(paths[key])
    return before, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", action="append", help="registry name (repeatable)")
    parser.add_argument("--out", type=Path, help="where to save (default: a temporary directory)")
    parser.add_argument("--reload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reload:  # the child process: reload everything, print the results as JSON
        spec = json.loads(str(args.reload))
        print(json.dumps({k: LOADERS[k.split("/")[1]](Path(p)) for k, p in spec.items()}))
        return
    before: dict[str, Ranked] = {}
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="intrinsic-retrieval-example-") as tmp:
        out = args.out or Path(tmp)
        for name in args.retriever or DEFAULT_RETRIEVERS:
            if name in OPTIONAL and not args.retriever and name not in available():
                print(f"{name:>6}: skipped (not available in this version)")
                continue
            try:
                b, p = build_and_save(name, out)
            except (ModelLoadError, NotTrainedError) as exc:
                if name not in OPTIONAL or args.retriever:
                    raise
                print(f"{name:>6}: skipped ({type(exc).__name__}: {exc})")
                continue
            before.update(b)
            paths.update(p)
        after = reload_in_new_process(paths)
    ok = True
    for key, ranked in before.items():
        same = after[key] == ranked
        ok &= same
        verdict = (
            "identical ranked ids and scores" if same else f"DIFFERENT: {ranked} vs {after[key]}"
        )
        print(f"{key:<18} saved, reloaded in a new process -> {verdict}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
