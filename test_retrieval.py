"""Retrieval evaluation: batched feature extraction, chunked top-k ranking and recall.

``recall_at_k`` is a pure function of features and labels. ``evaluate`` takes a model and a
dataset: it encodes every needed image once, composes the queries from the cached image features
when the model allows it (TIRG re-encoded each query image), and ranks the gallery by cosine
similarity.

Ranking. Queries are scored in chunks, ``q @ g.T`` in fp32 on the features' device, and each
chunk keeps its ``topk``: memory stays bounded (at most about 256 MB of similarities per chunk)
and nothing is sorted in full.

Ranking rule (ties). The gallery is ordered by descending cosine similarity; items with exactly
equal similarity are ordered by ascending gallery index, i.e. the order of a *stable* sort of
``-similarity``. Exact ties are real: duplicate gallery images (CSS's ``.dup`` file, a gallery
of training targets that repeats an image) give identical features. TIRG used
``np.argsort(-sims)`` (quicksort), whose order among ties is unspecified. ``topk`` fetches one
item more than needed, the list is re-sorted by (similarity, index), and a row whose last
fetched item ties with the k-th is re-ranked from its full similarity row (rare outside
galleries with repeated images). An excluded item (a query's own source image) is never a hit
and never takes a slot, even when k covers the whole gallery.

Label views. A dataset may offer ``extra_label_views() -> {name: view}``, where ``view`` maps a
label (``gallery_labels()[i]`` or ``query_label(q)``, strings) to a coarser label. ``evaluate``
then also reports recall under each view: for MIT-States, ``{"adj": first word, "noun": second
word}`` gives TIRG's adjective-only and noun-only recall.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets import progress, worker_init
from torch_function import normalize_images

GALLERY_CHUNK_BYTES = 256 * 2**20
QUALITATIVE_QUERIES = 6  # test queries whose top-10 lists ``test`` returns for the figure
QUALITATIVE_K = 10
TIE_ROWS = 256  # rows re-ranked at once when the k-th place ties with an unfetched item


def _as_tensor(x, dtype=None) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _check_finite(features: torch.Tensor, name: str) -> None:
    if features.numel() and not bool(torch.isfinite(features).all()):
        raise ValueError(
            f"{name} features hold NaN or inf values; the model produced non-finite features, "
            f"so no ranking is defined"
        )


def _default_chunk_size(n_gallery: int) -> int:
    return max(1, GALLERY_CHUNK_BYTES // (4 * max(n_gallery, 1)))


def _order_ties_by_index(values: torch.Tensor, indices: torch.Tensor):
    """Re-sort (C, K) top-k lists by (descending value, ascending index); topk leaves the order
    among equal values unspecified."""
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def _resolve_boundary_ties(similarities: torch.Tensor, kth_value: torch.Tensor, k: int):
    """Top-k lists under the tie rule for rows whose k-th value ties with an item outside topk.

    similarities (A, N), kth_value (A,) -> (A, k) indices: every item above the k-th value, then
    the lowest-index items equal to it, in (value, index) order.
    """
    kth_value = kth_value[:, None]
    above = similarities > kth_value
    tied = similarities == kth_value
    needed = k - above.sum(dim=1, keepdim=True)
    selected = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= needed))
    values, top = similarities.masked_fill(~selected, float("-inf")).topk(k, dim=1)
    return _order_ties_by_index(values, top)[1]


def _top_k_chunks(queries, gallery, k, exclude, chunk_size, desc):
    """Yield (start, stop, top): top (C, min(k, N)) gallery indices in rank order (the module's
    tie rule); an excluded item has similarity -inf, so it can only fill the last slots."""
    if chunk_size is None:
        chunk_size = _default_chunk_size(gallery.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    k = min(k, n_gallery)
    fetch = min(k + 1, n_gallery)  # one more: tells whether the k-th item ties with an unseen one
    starts = range(0, n_queries, chunk_size)
    for start in progress(starts, desc=desc, leave=False, disable=len(starts) < 8):
        stop = min(start + chunk_size, n_queries)
        similarities = queries[start:stop] @ gallery.T
        if exclude is not None:
            excluded = exclude[start:stop]
            rows = torch.nonzero(excluded >= 0).squeeze(1)
            similarities[rows, excluded[rows]] = float("-inf")
        values, top = similarities.topk(fetch, dim=1)
        values, top = _order_ties_by_index(values, top)
        if fetch > k:
            # Items outside the fetched list may tie with the k-th and have lower indices.
            ambiguous = torch.nonzero(values[:, k] == values[:, k - 1]).squeeze(1)
            for rows in ambiguous.split(TIE_ROWS):
                top[rows, :k] = _resolve_boundary_ties(similarities[rows], values[rows, k - 1], k)
        yield start, stop, top[:, :k]


def _prepare(query_features, gallery_features, exclude_indices):
    gallery = F.normalize(_as_tensor(gallery_features).float(), dim=1)
    queries = F.normalize(_as_tensor(query_features).float().to(gallery.device), dim=1)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"expected query features (Q, D) and gallery features (N, D), got "
            f"{tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    _check_finite(queries, "query")
    _check_finite(gallery, "gallery")
    exclude = None
    if exclude_indices is not None:
        exclude = _as_tensor(exclude_indices, torch.long).to(gallery.device)
        if exclude.shape != (queries.shape[0],):
            raise ValueError(
                f"exclude_indices must hold one gallery index (or -1) per query: "
                f"{queries.shape[0]} queries, {tuple(exclude.shape)} indices"
            )
        if len(exclude) and int(exclude.max()) >= gallery.shape[0]:
            raise ValueError(
                f"exclude_indices names gallery item {int(exclude.max())}, outside "
                f"0..{gallery.shape[0] - 1}"
            )
    return queries, gallery, exclude


@torch.no_grad()
def top_k_gallery(
    query_features, gallery_features, k: int, exclude_indices=None, chunk_size: int | None = None
) -> torch.Tensor:
    """The k most similar gallery items of every query, in rank order (the module's tie rule).

    query_features (Q, D), gallery_features (N, D): tensors or arrays, compared by cosine
    similarity. exclude_indices (Q,): a gallery index to rank last for each query, or -1.
    Returns a (Q, min(k, N)) long tensor of gallery indices, on the gallery's device.
    """
    queries, gallery, exclude = _prepare(query_features, gallery_features, exclude_indices)
    if queries.shape[0] == 0 or gallery.shape[0] == 0:
        return torch.zeros(queries.shape[0], 0, dtype=torch.long, device=gallery.device)
    chunks = _top_k_chunks(queries, gallery, k, exclude, chunk_size, "rank gallery")
    return torch.cat([top for _, _, top in chunks])


def _hits_from_top(top, exclude, labels, ks) -> dict[str, torch.Tensor]:
    """{name: (R, len(ks)) bool}: whether a hit is among the first k listed items of each row.

    top (R, K) gallery indices in rank order; exclude (R,) or None."""
    listed = torch.ones_like(top, dtype=torch.bool)
    if exclude is not None:
        listed &= top != exclude[:, None]
    # A slot counts for k when fewer than k listed items precede it.
    position = listed.cumsum(dim=1)
    out = {}
    for name, (query_labels, gallery_labels) in labels.items():
        match = listed & (gallery_labels[top] == query_labels[:, None])
        out[name] = torch.stack([(match & (position <= k)).any(dim=1) for k in ks], dim=1)
    return out


@torch.no_grad()
def recall_at_k_label_sets(
    query_features,
    gallery_features,
    label_sets: Mapping[str, tuple],
    ks: Sequence[int],
    exclude_indices=None,
    chunk_size: int | None = None,
) -> dict[str, dict[int, float]]:
    """``recall_at_k`` under several labelings of the same queries and gallery, ranked once.

    label_sets: {name: (query_target_labels (Q,), gallery_labels (N,))}, integer labels.
    Returns {name: {k: recall in [0, 1]}}.
    """
    queries, gallery, exclude = _prepare(query_features, gallery_features, exclude_indices)
    device = gallery.device
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    labels = {}
    for name, (query_labels, gallery_labels) in label_sets.items():
        query_labels = _as_tensor(query_labels, torch.long).to(device)
        gallery_labels = _as_tensor(gallery_labels, torch.long).to(device)
        if query_labels.shape != (n_queries,) or gallery_labels.shape != (n_gallery,):
            raise ValueError(
                f"label set {name!r}: {n_queries} query features but "
                f"{tuple(query_labels.shape)} labels, or {n_gallery} gallery features but "
                f"{tuple(gallery_labels.shape)} labels"
            )
        labels[name] = (query_labels, gallery_labels)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if n_queries == 0 or n_gallery == 0:
        return {name: {k: 0.0 for k in ks} for name in labels}
    hits = {name: torch.zeros(len(ks), dtype=torch.long, device=device) for name in labels}
    for start, stop, top in _top_k_chunks(queries, gallery, ks[-1], exclude, chunk_size, "recall"):
        exclude_rows = None if exclude is None else exclude[start:stop]
        label_rows = {n: (q[start:stop], g) for n, (q, g) in labels.items()}
        for name, h in _hits_from_top(top, exclude_rows, label_rows, ks).items():
            hits[name] += h.sum(dim=0)
    return {
        name: {k: h[i].item() / n_queries for i, k in enumerate(ks)} for name, h in hits.items()
    }


def recall_at_k(
    query_features,
    gallery_features,
    query_target_labels,
    gallery_labels,
    ks: Sequence[int],
    exclude_indices=None,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Fraction of queries with an item of the target's label among the k most similar.

    query_features (Q, D) and gallery_features (N, D): tensors or arrays, ranked by cosine
    similarity in fp32 on the gallery's device (ties: see the module docstring).
    query_target_labels (Q,) and gallery_labels (N,): integer labels; every gallery item with the
    query's label counts as a hit. exclude_indices (Q,): a gallery index to drop for each query
    (its own source image), or -1. ``chunk_size`` queries are scored at a time (default: chunks
    of at most 256 MB of similarities). Returns {k: recall in [0, 1]}.
    """
    return recall_at_k_label_sets(
        query_features,
        gallery_features,
        {"label": (query_target_labels, gallery_labels)},
        ks,
        exclude_indices,
        chunk_size,
    )["label"]


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, img_ids):
        self.dataset = dataset
        self.img_ids = img_ids

    def __len__(self):
        return len(self.img_ids)

    def __getitem__(self, i):
        return self.dataset.get_img(self.img_ids[i])


@torch.no_grad()
def encode_images(
    model,
    dataset,
    img_ids: Sequence[int],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    desc: str = "images",
) -> torch.Tensor:
    """Image features of ``img_ids`` (every batch, the tail included): (len(img_ids), D)."""
    loader = torch.utils.data.DataLoader(
        _Images(dataset, list(img_ids)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init,
    )
    features = [
        model.extract_img_feature(normalize_images(images.to(device, non_blocking=True)))
        for images in progress(loader, desc=f"encode {desc}", leave=False, disable=len(loader) < 2)
    ]
    return torch.cat(features).float()


@torch.no_grad()
def compose_queries(
    model,
    dataset,
    source_ids: Sequence[int],
    texts: Sequence[str],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    image_features: torch.Tensor | None = None,
    feature_row: dict[int, int] | None = None,
) -> torch.Tensor:
    """Composed query features (Q, D).

    When the model composes pooled features and ``image_features`` (with ``feature_row``:
    image id -> row) covers the sources, the query images are not encoded again; each distinct
    text is encoded once.
    """
    if not (model.composes_features and image_features is not None):
        out = []
        loader = torch.utils.data.DataLoader(
            _Images(dataset, list(source_ids)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=worker_init,
        )
        for b, images in enumerate(
            progress(loader, desc="compose queries", leave=False, disable=len(loader) < 2)
        ):
            batch_texts = list(texts[b * batch_size : (b + 1) * batch_size])
            out.append(model.compose_img_text(normalize_images(images.to(device)), batch_texts))
        return torch.cat(out).float()
    unique_texts = sorted(set(texts))
    text_row = {t: i for i, t in enumerate(unique_texts)}
    text_features = torch.cat(
        [
            model.extract_text_feature(unique_texts[i : i + batch_size])
            for i in range(0, len(unique_texts), batch_size)
        ]
    )
    rows = torch.tensor([feature_row[s] for s in source_ids], device=device)
    text_rows = torch.tensor([text_row[t] for t in texts], device=device)
    return torch.cat(
        [
            model.compose_img_text_features(
                image_features[rows[i : i + batch_size]],
                text_features[text_rows[i : i + batch_size]],
            )
            for i in range(0, len(rows), batch_size)
        ]
    ).float()


def _label_ids(query_labels: Sequence[str], gallery_labels: Sequence[str]):
    index: dict[str, int] = {}
    gallery = [index.setdefault(label, len(index)) for label in gallery_labels]
    queries = [index.get(label, -1) for label in query_labels]  # -1: no such item in the gallery
    return np.asarray(queries, dtype=np.int64), np.asarray(gallery, dtype=np.int64)


def label_views(dataset) -> dict[str, Callable[[str], str]]:
    """The dataset's extra label views ({} when it offers none), checked."""
    views = getattr(dataset, "extra_label_views", None)
    views = views() if callable(views) else {}
    for name, view in views.items():
        if name == "label" or not callable(view):
            raise TypeError(
                f"{type(dataset).__name__}.extra_label_views() must map names other than "
                f"'label' to callables (label -> coarser label); got {name!r}: {view!r}"
            )
    return dict(views)


def qualitative_query_indices(n_queries: int, n: int = QUALITATIVE_QUERIES) -> list[int]:
    """The fixed test queries shown in the qualitative figure: n evenly spaced positions (the
    same at every evaluation, so the figure shows progress)."""
    n = min(n, n_queries)
    return [int(i) for i in np.linspace(0, n_queries - 1, n, dtype=np.int64)] if n else []


@torch.no_grad()
def evaluate(
    model,
    dataset,
    queries: list[dict],
    gallery_ids: Sequence[int],
    exclude_source: bool,
    ks: Sequence[int],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    ranked_queries: Sequence[int] = (),
    ranked_k: int = QUALITATIVE_K,
) -> dict:
    """Recall@k of ``queries`` against the gallery ``gallery_ids`` of ``dataset``.

    A query dict has ``source_img_id``, ``mod['str']`` and ``target_caption``; a hit is a gallery
    image whose label (``dataset.gallery_labels()``) equals the query's
    (``dataset.query_label(q)``). With ``exclude_source`` the query's own source image is removed
    from its ranking. Every image is encoded once (the gallery and, for models that compose
    pooled features, the query images from the same cache).

    Returns ``{"recall": {k: frac}, "extra_recall": {view: {k: frac}}, "ranked": [...],
    "seconds_features": s, "seconds_ranking": s}``. ``extra_recall`` has one entry per
    ``dataset.extra_label_views()``; ``ranked`` has, for each position in ``ranked_queries``, a
    dict ``{"query_index", "gallery_ids" (top ``ranked_k`` image ids), "correct" (bools)}``.
    """
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        source_ids = [q["source_img_id"] for q in queries]
        unique_gallery = sorted(set(gallery_ids))
        needed = unique_gallery
        if model.composes_features:
            needed = sorted(set(unique_gallery) | set(source_ids))
        features = encode_images(
            model, dataset, needed, batch_size, device, num_workers, desc=f"{dataset.split} images"
        )
        row = {img_id: i for i, img_id in enumerate(needed)}
        query_features = compose_queries(
            model,
            dataset,
            source_ids,
            [q["mod"]["str"] for q in queries],
            batch_size,
            device,
            num_workers,
            features,
            row,
        )
        gallery_rows = torch.tensor([row[i] for i in gallery_ids], device=features.device)
        gallery_features = features[gallery_rows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds_features = time.perf_counter() - start

        start = time.perf_counter()
        labels = dataset.gallery_labels()
        query_label_names = [dataset.query_label(q) for q in queries]
        gallery_label_names = [labels[i] for i in gallery_ids]
        label_sets = {"label": _label_ids(query_label_names, gallery_label_names)}
        for name, view in label_views(dataset).items():
            label_sets[name] = _label_ids(
                [view(x) for x in query_label_names], [view(x) for x in gallery_label_names]
            )
        exclude = None
        if exclude_source:
            position = {img_id: i for i, img_id in enumerate(gallery_ids)}
            exclude = np.asarray([position.get(s, -1) for s in source_ids], dtype=np.int64)
        recalls = recall_at_k_label_sets(
            query_features, gallery_features, label_sets, ks, exclude_indices=exclude
        )
        ranked = []
        if len(ranked_queries):
            picked = torch.as_tensor(list(ranked_queries), dtype=torch.long)
            top = top_k_gallery(
                query_features[picked.to(query_features.device)],
                gallery_features,
                ranked_k + (exclude is not None),
                None if exclude is None else exclude[picked.numpy()],
            ).cpu()
            query_labels, gallery_labels = label_sets["label"]
            for i, q in enumerate(picked.tolist()):
                listed = [j for j in top[i].tolist() if exclude is None or j != exclude[q]]
                listed = listed[:ranked_k]
                ranked.append(
                    {
                        "query_index": q,
                        "gallery_ids": [int(gallery_ids[j]) for j in listed],
                        "correct": [bool(gallery_labels[j] == query_labels[q]) for j in listed],
                    }
                )
        seconds_ranking = time.perf_counter() - start
    finally:
        model.train(was_training)
    return {
        "recall": recalls.pop("label"),
        "extra_recall": recalls,
        "ranked": ranked,
        "seconds_features": seconds_features,
        "seconds_ranking": seconds_ranking,
    }


def evaluation_groups(dataset) -> list[dict]:
    """The dataset's test protocol as ``[{name, queries, gallery_ids}]``: its
    ``evaluation_groups()`` when it has one (FashionIQ: one group per category, each ranked
    against its own gallery), else TIRG's single group, every test query against every image."""
    groups = getattr(dataset, "evaluation_groups", None)
    if callable(groups):
        return list(groups())
    everything = range(len(dataset.imgs))
    return [{"name": "all", "queries": dataset.get_test_queries(), "gallery_ids": everything}]


def test(
    model,
    dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    ranked_queries: Sequence[int] | None = None,
) -> dict:
    """TIRG's test protocol: every test query against every image of the split (the query's own
    source excluded, unless the dataset's ``exclude_source_in_test`` is False).

    A dataset with several ``evaluation_groups`` (FashionIQ's categories) is ranked group by
    group; its ``recall`` is then the mean over groups of each R@k (the papers' average) and
    ``extra_recall`` holds every group's own recall under its name (and ``<group>_<view>`` for
    label views). ``ranked_queries`` (positions in ``get_test_queries()``; default:
    ``qualitative_query_indices``) are the queries whose top-10 lists are returned under
    ``"ranked"``, for the qualitative figure.
    """
    queries = dataset.get_test_queries()
    if ranked_queries is None:
        ranked_queries = qualitative_query_indices(len(queries))
    position = {id(q): i for i, q in enumerate(queries)}  # groups hold the same query dicts
    wanted = set(ranked_queries)
    exclude_source = getattr(dataset, "exclude_source_in_test", True)
    results = []
    for group in evaluation_groups(dataset):
        group_queries = list(group["queries"])
        res = evaluate(
            model,
            dataset,
            group_queries,
            group["gallery_ids"],
            exclude_source=exclude_source,
            ks=dataset.recall_ks,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            ranked_queries=[
                j for j, q in enumerate(group_queries) if position.get(id(q), -1) in wanted
            ],
        )
        for entry in res["ranked"]:
            entry["query_index"] = position[id(group_queries[entry["query_index"]])]
        results.append((group["name"], res))
    if len(results) == 1:
        return results[0][1]
    ks = sorted(results[0][1]["recall"])
    extra = {}
    for name, res in results:
        extra[name] = res["recall"]
        extra.update({f"{name}_{view}": r for view, r in res["extra_recall"].items()})
    return {
        "recall": {k: float(np.mean([res["recall"][k] for _, res in results])) for k in ks},
        "extra_recall": extra,
        "ranked": sorted(
            (entry for _, res in results for entry in res["ranked"]),
            key=lambda entry: entry["query_index"],
        ),
        "seconds_features": sum(res["seconds_features"] for _, res in results),
        "seconds_ranking": sum(res["seconds_ranking"] for _, res in results),
    }


def training_gallery_ids(queries: list[dict]) -> list[int]:
    """The M_s gallery of a sample of training queries: every target image once, by id. A
    query's target sits at ``training_gallery_ids(queries).index(q["target_img_id"])``; hits
    are judged by label, as in the test protocol."""
    return sorted({int(q["target_img_id"]) for q in queries})


def evaluate_composed(
    model, trainset, testset, train_queries, device, batch_size: int, num_workers: int = 0
) -> dict:
    """Composed retrieval's evaluation in percent: {"train": M_s's recalls and M (their mean),
    "test": M_t's, "ranked": top-10 lists of a few test queries (for the figure)}."""
    train = test_on_training_queries(
        model, trainset, train_queries, batch_size, device, num_workers
    )
    test_result = test(model, testset, batch_size, device, num_workers)
    result = {}
    for split, res in (("train", train), ("test", test_result)):
        recalls = {f"R@{k}": 100.0 * v for k, v in res["recall"].items()}
        result[split] = {
            **recalls,
            "M": sum(recalls.values()) / len(recalls),
            "seconds_features": res["seconds_features"],
            "seconds_ranking": res["seconds_ranking"],
        }
        for view, view_recall in res.get("extra_recall", {}).items():  # e.g. MIT-States adj/noun
            result[split].update({f"{view}_R@{k}": 100.0 * v for k, v in view_recall.items()})
    result["ranked"] = test_result["ranked"]
    return result


def test_on_training_queries(
    model, dataset, queries: list[dict], batch_size: int, device: torch.device, num_workers: int = 0
) -> dict:
    """TIRG's approximation of training accuracy: a fixed sample of training queries ranked
    against the gallery of their own target images (``training_gallery_ids``).

    Each target image is listed once. (TIRG listed it once per query: a target of many queries
    then filled the top k with exact ties of itself, and on a small set R@1 = R@5 = R@10.)"""
    return evaluate(
        model,
        dataset,
        queries,
        training_gallery_ids(queries),
        exclude_source=False,
        ks=dataset.recall_ks,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
    )


# ============================================================================================
# Learning to hash (issue 17): exact, chunked Hamming ranking of ±1 codes.
#
# Ranking rule: the database is ordered by ascending Hamming distance to the query, and items
# at equal distance by ascending database index (a stable sort of the distances). Ties are the
# rule, not the exception: 64-bit codes take only 65 distance values.
#
# How (chosen by measurement, benchmarks/bench_hashing.py): distances come from one fp32
# matmul of the ±1 codes, hamming = (bits - q @ d.T) / 2, exact for any code length below
# 2**24. mAP needs no sort: an item's rank under the rule is (#items at a smaller distance) +
# (#items at its distance with an index <= its own). The relevant items of a query (those with
# its label) split the database into segments, and one histogram of (segment, distance) per
# query (``torch.bincount``) gives both counts for every relevant item, so a query costs
# O(N + R * bits) after the matmul instead of a sort of N (R: its number of relevant items).
# On 2 idle CPU cores at the CUB shape (5,794 x 5,994, 64 bits) the matmul took 0.09 s, a
# stable torch.sort of the distance rows 1.2 s, and the histogram path about 0.3 s in all.
# ============================================================================================


def _as_codes(codes, name: str) -> torch.Tensor:
    codes = _as_tensor(codes).float()
    if codes.dim() != 2:
        raise ValueError(f"{name} must be a (n, bits) tensor of ±1, got shape {tuple(codes.shape)}")
    if codes.numel() and not bool(((codes == 1) | (codes == -1)).all()):
        raise ValueError(
            f"{name} must hold only +1 and -1 (sign codes, with 0 mapped to -1: hashing.binarize)"
        )
    return codes


def _compact_labels(query_labels, database_labels):
    """Integer labels (any values) -> 0-based ids shared by queries and database."""
    q = _as_tensor(query_labels).reshape(-1).long()
    d = _as_tensor(database_labels).reshape(-1).long()
    _, inverse = torch.unique(torch.cat([q, d]), return_inverse=True)
    return inverse[: len(q)], inverse[len(q) :]


def hamming_distances(query_codes: torch.Tensor, database_codes: torch.Tensor) -> torch.Tensor:
    """(Q, bits) and (N, bits) ±1 float codes -> (Q, N) float32 Hamming distances (exact)."""
    bits = query_codes.shape[1]
    return (bits - query_codes @ database_codes.T) * 0.5


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.cumsum(dim) - x


def hamming_ranking_metrics(
    query_codes,
    database_codes,
    query_labels,
    database_labels,
    top_k: int | None = None,
    exclude_indices=None,
    chunk_elements: int = 1 << 22,
) -> dict[str, torch.Tensor]:
    """Per-query AP (and precision at ``top_k``) of the Hamming ranking, exactly, in chunks.

    Args:
        query_codes: (Q, bits) ±1; database_codes: (N, bits) ±1 (tensors or arrays).
        query_labels: (Q,) int; database_labels: (N,) int. Relevant = same label.
        top_k: None for AP over the whole ranking, AP = sum_i P@i rel_i / sum_i rel_i; an int K
            for AP@K = sum_{i<=K} P@i rel_i / sum_{i<=K} rel_i (the denominator counts the
            relevant items *retrieved* in the top K, the usual mAP@K of deep hashing code).
        exclude_indices: None, or (Q,) database indices to drop from each query's ranking (-1:
            none): the item takes no rank and is never relevant (M_s: a training image as a
            query against the training database, itself excluded).
        chunk_elements: working-memory bound, in elements per chunk of queries.
    Returns:
        {"ap": (Q,) float64, "relevant_in_top_k": (Q,) int64 (None top_k: all relevant),
         "candidates": (Q,) int64 database size after exclusion}. A query with no relevant item
        (within the top K) has AP 0; the seed's compute_mAP returned NaN for it.
    """
    queries = _as_codes(query_codes, "query_codes")
    database = _as_codes(database_codes, "database_codes").to(queries.device)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"query codes have {queries.shape[1]} bits, database codes {database.shape[1]}"
        )
    n_queries, bits = queries.shape
    n_db = database.shape[0]
    q_labels, db_labels = _compact_labels(query_labels, database_labels)
    if len(q_labels) != n_queries or len(db_labels) != n_db:
        raise ValueError(
            f"{len(q_labels)} query labels for {n_queries} queries, {len(db_labels)} database "
            f"labels for {n_db} database codes"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    device = queries.device
    q_labels, db_labels = q_labels.to(device), db_labels.to(device)
    exclude = torch.full((n_queries,), -1, dtype=torch.long, device=device)
    if exclude_indices is not None:
        exclude = _as_tensor(exclude_indices).reshape(-1).long().to(device)
        if len(exclude) != n_queries or bool(((exclude < -1) | (exclude >= n_db)).any()):
            raise ValueError(f"exclude_indices must be {n_queries} indices in -1..{n_db - 1}")

    n_buckets = bits + 2  # distances 0..bits, and bits + 1 for an excluded item
    n_labels = int(max(q_labels.max().item() if n_queries else 0, db_labels.max().item()) + 1)
    relevant_count = torch.bincount(db_labels, minlength=n_labels)
    # Queries sorted by label, so a chunk needs the segments of few labels.
    order = torch.argsort(q_labels, stable=True)
    max_segments = int(relevant_count.max().item()) + 1
    ap = torch.zeros(n_queries, dtype=torch.float64, device=device)
    retrieved = torch.zeros(n_queries, dtype=torch.long, device=device)
    db_positions = torch.arange(n_db, device=device)
    start = 0
    while start < n_queries:
        # Rows per chunk: the (rows, N) distances and the (rows, S, buckets) histogram fit.
        rows = max(1, min(chunk_elements, 1 << 24) // max(n_db, max_segments * n_buckets))
        idx = order[start : start + rows]
        start += rows
        rows = len(idx)
        labels = q_labels[idx]
        n_rel = relevant_count[labels]  # (rows,)
        n_seg = int(n_rel.max().item()) + 1
        row_codes = queries[idx]
        # Segment of item i for label c: how many items of label c come before i.
        chunk_labels, label_slot = torch.unique_consecutive(labels, return_inverse=True)
        is_rel = db_labels[None, :] == chunk_labels[:, None]  # (U, N)
        segments = _exclusive_cumsum(is_rel.long(), 1).float()  # (U, N)
        # The bin of each item: (row * buckets + distance) * S + segment, in fp32 (exact: below
        # 2**24), built in place on the gathered segments: few passes over (rows, N).
        flat = segments[label_slot]
        flat.add_(row_codes @ database.T, alpha=-0.5 * n_seg)
        row_base = torch.arange(rows, device=device, dtype=torch.float32) * (n_buckets * n_seg)
        flat += (row_base + n_seg * bits * 0.5)[:, None]
        row_exclude = exclude[idx]
        rows_ex = torch.nonzero(row_exclude >= 0).flatten()
        if len(rows_ex):  # an excluded item moves to the extra bucket bits + 1
            cols_ex = row_exclude[rows_ex]
            dots = (row_codes[rows_ex] * database[cols_ex]).sum(1)
            flat[rows_ex, cols_ex] += ((bits + 1) - (bits - dots) * 0.5) * n_seg
        hist = torch.bincount(flat.view(-1).long(), minlength=rows * n_buckets * n_seg)
        hist = hist.view(rows, n_buckets, n_seg)
        closer = _exclusive_cumsum(hist.sum(2), 1)  # (rows, buckets): items at a smaller distance
        tied_before = hist.cumsum(2)  # (rows, buckets, S): same distance, index <= segment end
        # Relevant items of each row, in database order, padded to the chunk's largest class.
        n_pad = max(n_seg - 1, 1)
        rel_pos = torch.zeros(len(chunk_labels), n_pad, dtype=torch.long, device=device)
        rel_valid = torch.zeros(len(chunk_labels), n_pad, dtype=torch.bool, device=device)
        for u in range(len(chunk_labels)):
            pos = db_positions[is_rel[u]]
            rel_pos[u, : len(pos)] = pos
            rel_valid[u, : len(pos)] = True
        rel_pos, rel_valid = rel_pos[label_slot], rel_valid[label_slot]  # (rows, n_pad)
        rel_dots = (row_codes[:, None, :] * database[rel_pos]).sum(2)
        rel_dist = ((bits - rel_dots) * 0.5).long()  # (rows, n_pad)
        rel_dist[rel_pos == row_exclude[:, None]] = bits + 1
        # rank = items at a smaller distance + items at this distance up to this segment's end
        rank = closer.gather(1, rel_dist) + tied_before.gather(1, rel_dist[:, None, :]).squeeze(1)
        counted = rel_valid & (rel_dist <= bits)  # excluded items are never relevant
        # Rank among the relevant items: the same two counts over the relevant items alone.
        one_hot = torch.zeros(rows, n_buckets, n_pad, dtype=torch.long, device=device)
        one_hot.scatter_(1, rel_dist[:, None, :], counted[:, None, :].long())
        rel_rank = _exclusive_cumsum(one_hot.sum(2), 1).gather(1, rel_dist)
        rel_rank += one_hot.cumsum(2).gather(1, rel_dist[:, None, :]).squeeze(1)
        if top_k is not None:
            counted &= rank <= top_k
        precision = rel_rank.double() / rank.clamp_min(1).double()
        total = (precision * counted).sum(1)
        found = counted.sum(1)
        ap[idx] = torch.where(found > 0, total / found.clamp_min(1), torch.zeros_like(total))
        retrieved[idx] = found
    candidates = n_db - (exclude >= 0).long()
    return {"ap": ap, "relevant_in_top_k": retrieved, "candidates": candidates}


def hamming_map(
    query_codes,
    database_codes,
    query_labels,
    database_labels,
    top_k: int | None = None,
    exclude_indices=None,
) -> float:
    """mAP in [0, 1] of the Hamming ranking (ties by database index); see
    ``hamming_ranking_metrics`` for the arguments, AP and AP@K. Codes are ±1, (Q, bits) and
    (N, bits); labels are integer arrays (Q,) and (N,)."""
    result = hamming_ranking_metrics(
        query_codes, database_codes, query_labels, database_labels, top_k, exclude_indices
    )
    return float(result["ap"].mean()) if len(result["ap"]) else 0.0


def hamming_precision_at_k(
    query_codes, database_codes, query_labels, database_labels, k: int, exclude_indices=None
) -> float:
    """Mean over queries of (relevant items among the first k of the Hamming ranking) / k,
    with k capped at the number of candidates (database size after exclusion)."""
    result = hamming_ranking_metrics(
        query_codes, database_codes, query_labels, database_labels, k, exclude_indices
    )
    denominator = result["candidates"].clamp(max=k).clamp_min(1).double()
    return float((result["relevant_in_top_k"] / denominator).mean()) if len(denominator) else 0.0


def hamming_top_k(
    query_codes, database_codes, k: int, exclude_indices=None, chunk_elements: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest database codes of each query in Hamming distance, ties by index.

    Returns (distances, indices), both (Q, k) int64, each row in ranking order. The (distance,
    index) pairs are made one unique int64 key, so ``topk`` needs no tie repair.
    """
    queries = _as_codes(query_codes, "query_codes")
    database = _as_codes(database_codes, "database_codes").to(queries.device)
    n_queries, bits = queries.shape
    n_db = database.shape[0]
    if not 1 <= k <= n_db:
        raise ValueError(f"k must be in 1..{n_db}, got {k}")
    exclude = None
    if exclude_indices is not None:
        exclude = _as_tensor(exclude_indices).reshape(-1).long().to(queries.device)
    rows = max(1, chunk_elements // n_db)
    positions = torch.arange(n_db, device=queries.device)
    out_d = torch.empty(n_queries, k, dtype=torch.long, device=queries.device)
    out_i = torch.empty_like(out_d)
    for start in range(0, n_queries, rows):
        keys = hamming_distances(queries[start : start + rows], database).long()
        if exclude is not None:
            ex = exclude[start : start + rows]
            keep = torch.nonzero(ex >= 0).flatten()
            keys[keep, ex[keep]] = bits + 1
        keys.mul_(n_db).add_(positions)
        top = torch.topk(keys, k, dim=1, largest=False, sorted=True).values
        out_d[start : start + rows] = top // n_db
        out_i[start : start + rows] = top % n_db
    return out_d, out_i


# ===================================================================================== ESA
# Image-text recall (issue 16), appended: it uses only torch and Callable from above this line.
#
# Caption j belongs to image j // captions_per_image. The rank of a query's positive is the
# number of gallery items ordered before it: items with a higher score, and items with an equal
# score and a lower index (ties ordered by index, as a stable sort of -score would order them).
# Counting needs no sort and is exact; R@k is the share of queries whose rank is < k. For i2t
# the image's rank is that of its best-ranked caption (ESA's / VSE++'s protocol).

import math  # noqa: E402

IMAGE_TEXT_CHUNK_ELEMENTS = 1 << 24  # score-matrix elements per block (64 MB in fp32)


def _image_text_tensor(x, dtype) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.to(dtype)


def image_text_ranks(
    score_fn: Callable[[slice, slice], torch.Tensor],
    n_images: int,
    n_captions: int,
    captions_per_image: int = 5,
    chunk_elements: int = IMAGE_TEXT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t ranks (n_images,), t2i ranks (n_captions,)), 0-based, from a score function.

    ``score_fn(image_rows, caption_columns)`` returns the (rows, columns) block of the
    image x caption score matrix for two slices. The matrix is visited in blocks of whole images
    (rows) by their captions (columns), each block computed exactly once: first the diagonal
    blocks, which hold every positive (the exact thresholds of both directions), then the others.
    Both directions count from the same numbers, so a positive is never compared with a score
    recomputed by another product.
    """
    per = captions_per_image
    if n_captions != per * n_images:
        raise ValueError(f"{n_captions} captions for {n_images} images: expected {per} per image")
    rows = max(1, min(n_images, math.isqrt(max(1, chunk_elements // per))))
    starts = list(range(0, n_images, rows))
    spans = [(i0, min(i0 + rows, n_images)) for i0 in starts]
    i2t_best = i2t_best_col = t2i_positive = i2t_ranks = t2i_ranks = device = None

    def count(block, i0, i1, c0, c1):
        cs = slice(c0 * per, c1 * per)
        best, best_col = i2t_best[i0:i1, None], i2t_best_col[i0:i1, None]
        ahead = torch.count_nonzero(block > best, dim=1)
        ties = block == best
        if ties.any():  # equal scores: the lower caption index goes first
            columns = torch.arange(c0 * per, c1 * per, device=device)
            ahead += (ties & (columns[None, :] < best_col)).sum(1)
        i2t_ranks[i0:i1] += ahead
        positive = t2i_positive[None, cs]
        above = torch.count_nonzero(block > positive, dim=0)
        ties = block == positive
        if ties.any():  # equal scores: the lower image index goes first
            own = torch.arange(c0 * per, c1 * per, device=device)[None, :] // per
            above += (ties & (torch.arange(i0, i1, device=device)[:, None] < own)).sum(0)
        t2i_ranks[cs] += above

    # diagonal blocks first: they hold every positive, and are counted as soon as read
    for i0, i1 in spans:
        block = score_fn(slice(i0, i1), slice(i0 * per, i1 * per)).float()
        if i2t_ranks is None:
            device = block.device
            i2t_best = torch.empty(n_images, device=device)
            i2t_best_col = torch.empty(n_images, dtype=torch.long, device=device)
            t2i_positive = torch.empty(n_captions, device=device)
            i2t_ranks = torch.zeros(n_images, dtype=torch.long, device=device)
            t2i_ranks = torch.zeros(n_captions, dtype=torch.long, device=device)
        local = torch.arange(i1 - i0, device=device)
        cols = local[:, None] * per + torch.arange(per, device=device)  # (r, per), local
        positive = block.gather(1, cols)
        best = positive.max(1).values
        # the first positive in the order: the best score, and among equals the lowest index
        first = torch.where(positive == best[:, None], cols, block.shape[1]).min(1).values
        i2t_best[i0:i1], i2t_best_col[i0:i1] = best, first + i0 * per
        t2i_positive[i0 * per : i1 * per] = positive.reshape(-1)
        count(block, i0, i1, i0, i1)
    for i0, i1 in spans:
        for c0, c1 in spans:
            if c0 != i0:
                count(score_fn(slice(i0, i1), slice(c0 * per, c1 * per)).float(), i0, i1, c0, c1)
    return i2t_ranks, t2i_ranks


def recalls_from_ranks(i2t_ranks, t2i_ranks, ks=(1, 5, 10)) -> dict[str, float]:
    """{"i2t_R@k", ..., "t2i_R@k", "rsum"} in percent from 0-based ranks."""
    out = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["rsum"] = sum(out.values())
    return out


def _feature_score_fn(image_features, caption_features):
    images = _image_text_tensor(image_features, torch.float32)
    captions = _image_text_tensor(caption_features, torch.float32).to(images.device)
    for name, x in (("image_features", images), ("caption_features", captions)):
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a (N, D) matrix, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: holds NaN or infinite values")

    def score_fn(rows: slice, columns: slice) -> torch.Tensor:
        return images[rows] @ captions[columns].T

    return score_fn, len(images), len(captions)


def image_text_recall(
    image_features,
    caption_features,
    captions_per_image: int = 5,
    ks=(1, 5, 10),
    chunk_elements: int = IMAGE_TEXT_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Image->text and text->image recall of (N, D) image and (N * captions_per_image, D)
    caption features (tensors or arrays; L2-normalised features give cosine similarity).

    Returns ``{"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", ..., "rsum"}`` in percent. Exact:
    chunked ``images @ captions.T`` on the features' device, ranks counted (no sort), ties
    ordered by index; each matrix block is computed once per direction.
    """
    score_fn, n_images, n_captions = _feature_score_fn(image_features, caption_features)
    ranks = image_text_ranks(score_fn, n_images, n_captions, captions_per_image, chunk_elements)
    return recalls_from_ranks(*ranks, ks=ks)


def image_text_recall_from_scores(
    scores,
    captions_per_image: int = 5,
    ks=(1, 5, 10),
    n_images: int | None = None,
    n_captions: int | None = None,
    chunk_elements: int = IMAGE_TEXT_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """``image_text_recall`` from a precomputed (n_images, n_captions) score matrix, or from a
    function ``scores(image_rows: slice, caption_columns: slice) -> block`` (then give
    n_images and n_captions), e.g. ESA*'s average of two models' similarities."""
    if callable(scores):
        if n_images is None or n_captions is None:
            raise ValueError("a score function needs n_images and n_captions")
        score_fn = scores
    else:
        matrix = _image_text_tensor(scores, torch.float32)
        n_images, n_captions = matrix.shape

        def score_fn(rows, columns):
            return matrix[rows, columns]

    ranks = image_text_ranks(score_fn, n_images, n_captions, captions_per_image, chunk_elements)
    return recalls_from_ranks(*ranks, ks=ks)


def image_text_recall_folds(
    image_features=None,
    caption_features=None,
    captions_per_image: int = 5,
    ks=(1, 5, 10),
    folds: int = 5,
    scores=None,
    n_images: int | None = None,
) -> dict[str, float]:
    """COCO's 5-fold 1K protocol: the images split into ``folds`` consecutive equal folds (1,000
    images and their 5,000 captions each on COCO's 5K testall), recall within each fold, and the
    mean of every metric over the folds. Give features, or ``scores`` (a matrix or a function as
    in ``image_text_recall_from_scores``, with ``n_images`` for a function)."""
    if scores is None:
        score_fn, n_images, _ = _feature_score_fn(image_features, caption_features)
    elif callable(scores):
        score_fn = scores
        if n_images is None:
            raise ValueError("a score function needs n_images")
    else:
        matrix = _image_text_tensor(scores, torch.float32)
        n_images = matrix.shape[0]

        def score_fn(rows, columns):
            return matrix[rows, columns]

    if n_images % folds:
        raise ValueError(f"{n_images} images do not split into {folds} equal folds")
    per_fold = n_images // folds
    results = []
    for fold in range(folds):
        i0, c0 = fold * per_fold, fold * per_fold * captions_per_image

        def fold_scores(rows, columns, i0=i0, c0=c0):
            return score_fn(
                slice(i0 + rows.start, i0 + rows.stop), slice(c0 + columns.start, c0 + columns.stop)
            )

        ranks = image_text_ranks(
            fold_scores, per_fold, per_fold * captions_per_image, captions_per_image
        )
        results.append(recalls_from_ranks(*ranks, ks=ks))
    return {key: sum(r[key] for r in results) / folds for key in results[0]}
