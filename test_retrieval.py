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
from tqdm import tqdm

from datasets import worker_init
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
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 8):
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
        for images in tqdm(loader, desc=f"encode {desc}", leave=False, disable=len(loader) < 2)
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
            tqdm(loader, desc="compose queries", leave=False, disable=len(loader) < 2)
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
