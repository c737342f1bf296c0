"""`fit`: train the retrieval tokens and alpha with the paper's soft cross-entropy (sec. 3.2).

For query x with oracle chunks O: ``loss = -(1/|O|) sum_{c in O} log softmax_c(S(x, .))`` where S
is the INTRA score of Eq. 3 (pooled vectors, Reverse-QWK folded queries, alpha-weighted MaxSim).
The backbone is frozen; gradients reach only the m token embeddings (through the decoder's
retrieval pass) and alpha. The softmax runs over the whole corpus when it has at most
`n_candidates` chunks, otherwise over `n_candidates` chunks, half the best of the encoder-side
stage (hard negatives) and half drawn uniformly from the rest (redrawn every epoch), plus the
positives: the paper's full-corpus partition function is then approximated, which is what makes
training tractable on CPU. The uniform half matters: with hard negatives alone, the positives
that the encoder stage misses are the only candidates from outside its top list, and the head
learns to prefer "not liked by the encoder stage", which does not rank a whole corpus (measured
with Gemma 3: training loss fell while full-corpus nDCG@10 stayed at chance).

With ``lora_rank`` the head also carries a low-rank update of the decoder's query projections
(trained with it; see `RetrievalHead`). Checkpoints (safetensors + JSON, no pickle) hold every
head parameter, the Adam moments and the step; a run
with the same data and settings resumes from the last checkpoint and ends where an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...errors import CheckpointMismatchError, EmptyCorpusError, InvalidInputError, UnknownIdError
from .qwk import score_pooled

if TYPE_CHECKING:
    from .retriever import IntraRetriever

_CKPT_TENSORS = "checkpoint.safetensors"
_CKPT_STATE = "checkpoint.json"


def _examples(r: IntraRetriever, queries: Any, positives: Any) -> list[tuple[str, list[int]]]:
    """Normalise (queries, positives) to [(text, positive rows)].

    Accepts parallel sequences, or mappings keyed by query id (BEIR style; `positives` may be
    qrels ``{qid: {doc_id: relevance}}``, relevance > 0 counting as positive). Positive ids may be
    chunk ids or document ids (a document id stands for all its chunks)."""
    if isinstance(queries, Mapping):
        if not isinstance(positives, Mapping):
            raise InvalidInputError("with queries given as a mapping, positives must be one too")
        pairs = [(str(queries[q]), positives[q]) for q in queries if q in positives]
    else:
        if positives is None or isinstance(queries, str) or len(queries) != len(positives):
            raise InvalidInputError("queries and positive_chunk_ids must have the same length")
        pairs = list(zip(queries, positives, strict=True))
    out: list[tuple[str, list[int]]] = []
    missing: list[str] = []
    for text, pos in pairs:
        if isinstance(pos, Mapping):
            ids = [str(d) for d, rel in pos.items() if rel and float(rel) > 0]
        elif isinstance(pos, str):
            ids = [pos]
        else:
            ids = [str(d) for d in pos]
        rows = r.store.rows_for_ids(ids) if ids else []
        if not rows:
            missing.extend(ids[:1])
            continue
        r._check_query(text)
        out.append((text, rows))
    if not out:
        raise UnknownIdError(
            f"no training example has a positive chunk in the store (e.g. {missing[:3]})"
        )
    return out


def _data_hash(examples: Sequence[tuple[str, list[int]]], settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text, rows in examples:
        h.update(text.encode())
        h.update(json.dumps(rows).encode())
    return h.hexdigest()


def _save_ckpt(path: Path, head: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = {}
    for name, p in head.named_parameters():
        tensors[name] = p.detach().cpu().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{name}.{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"opt.{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(
                1
            )
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (_CKPT_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path / _CKPT_TENSORS)
    tmp_state = path / (_CKPT_STATE + ".tmp")
    tmp_state.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp_state.replace(path / _CKPT_STATE)


def _load_ckpt(
    path: Path, head: Any, opt: torch.optim.Optimizer, data_hash: str
) -> dict[str, Any] | None:
    if not (path / _CKPT_STATE).exists() or not (path / _CKPT_TENSORS).exists():
        return None
    state = json.loads((path / _CKPT_STATE).read_text())
    if state.get("data_hash") != data_hash:
        raise CheckpointMismatchError(
            f"checkpoint in {path} belongs to other training data, settings or model; "
            "use another checkpoint_dir or resume=False"
        )
    tensors = load_file(str(path / _CKPT_TENSORS))
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(tensors[name])
    for name, p in head.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"opt.{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
            }
    return state


def _candidates(
    live: torch.Tensor, top: torch.Tensor, positives: list[int], n: int, seed: int
) -> torch.Tensor:
    """`top` (encoder-stage hard negatives) + uniform draws from the other live rows up to `n`
    + every positive, without repeats."""
    taken = torch.zeros_like(live)
    taken[top] = True
    rest = torch.nonzero(live & ~taken, as_tuple=False).flatten()
    k = max(0, min(n - int(top.numel()), int(rest.numel())))
    pick = torch.randperm(int(rest.numel()), generator=torch.Generator().manual_seed(seed))[:k]
    cand = torch.cat([top, rest[pick]])
    seen = set(cand.tolist())
    extra = torch.tensor([p for p in positives if p not in seen], dtype=torch.long)
    return torch.cat([cand, extra])


def fit(
    r: IntraRetriever,
    queries: Any,
    positive_chunk_ids: Any = None,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 3e-3,
    n_candidates: int = 256,
    checkpoint_dir: str | PathLike[str] | None = None,
    checkpoint_every: int = 20,
    resume: bool = True,
    max_steps: int | None = None,
    seed: int = 0,
    lora_rank: int = 0,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Train the retrieval head; returns ``{"steps", "losses" (per step), "examples"}``.

    `max_steps` stops early (the checkpoint lets a later call continue). The trained head is
    stored in the store (``aux/intra_head``) at the end. ``lora_rank > 0`` trains more than the
    paper's recipe: a rank-`lora_rank` update of every decoder layer's query projection, used
    only by the retrieval pass (the backbone, the store and generation stay as they are).
    """
    if epochs < 1 or batch_size < 1 or n_candidates < 1 or lr <= 0:
        raise InvalidInputError("epochs, batch_size, n_candidates and lr must be positive")
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 0:
        raise InvalidInputError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
    if len(r) == 0:
        raise EmptyCorpusError("index chunks before calling fit()")
    assert r.head is not None
    with r.lock:
        examples = _examples(r, queries, positive_chunk_ids)
        settings = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "n_candidates": n_candidates,
            "seed": seed,
            "k0": r.k0,
            "m": r.m,
            "binding": r._fingerprint(),
            "rows": r.store.num_rows,
            "query_positions": r.query_positions,
            "lora_rank": lora_rank or r.head.lora_rank,
        }
        data_hash = _data_hash(examples, settings)
        head = r.head
        if lora_rank and head.lora_rank != lora_rank:
            head.add_lora(r.query_projs(), lora_rank, seed=seed)
        params = list(head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        start_step = 0
        history: list[float] = []
        if ckpt is not None and resume:
            state = _load_ckpt(ckpt, head, opt, data_hash)
            if state is not None:
                start_step, history = int(state["step"]), list(state["losses"])
        live = r.store.live_mask()
        n_live = int(live.sum())
        pooled, rnorm = r._pooled(), r._rnorm()
        # the encoder-side stage does not depend on the head: compute C0 and candidates once
        prep: list[tuple[list[int], torch.Tensor]] = []
        for text, _rows in examples:
            qstates = r._query_states(text)
            top, _ = r.initial_context(qstates, live, max(r.k0, min(n_candidates // 2, n_live)))
            prep.append((top[: r.k0].tolist(), top))
        n_batches = (len(examples) + batch_size - 1) // batch_size
        total = epochs * n_batches
        stop = total if max_steps is None else min(total, max_steps)
        show = r.show_progress if show_progress is None else show_progress
        bar = tqdm(total=stop, initial=min(start_step, stop), desc="fit (intra)", disable=not show)
        step = start_step
        r.model.train(False)
        while step < stop:
            epoch, b = divmod(step, n_batches)
            order = torch.randperm(
                len(examples), generator=torch.Generator().manual_seed(seed + epoch)
            )
            batch = order[b * batch_size : (b + 1) * batch_size].tolist()
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for i in batch:
                text, pos = examples[i]
                c0, top = prep[i]
                if n_live <= n_candidates:
                    cand = torch.nonzero(live, as_tuple=False).flatten()
                else:
                    cand = _candidates(live, top, pos, n_candidates, seed + epoch * 1_000_003 + i)
                folded = r.retrieval_pass(text, c0, head)
                scores = score_pooled(
                    folded,
                    head.alpha,
                    pooled[cand],
                    r.layers,
                    None if rnorm is None else rnorm[cand],
                )
                logp = torch.log_softmax(scores, 0)
                target = torch.isin(cand, torch.tensor(pos, dtype=torch.long))
                loss = -logp[target].mean() / len(batch)
                loss.backward()
                batch_loss += float(loss.detach())
            opt.step()
            step += 1
            history.append(batch_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}")
            if ckpt is not None and (step % checkpoint_every == 0 or step == stop):
                _save_ckpt(
                    ckpt, head, opt, {"step": step, "losses": history, "data_hash": data_hash}
                )
        bar.close()
        for p in params:
            p.requires_grad_(False)
        if step >= total:
            head.trained = True
        if step > start_step or head.trained:
            r.save_head()
    return {"steps": step, "total_steps": total, "losses": history, "examples": len(examples)}
