"""Retrieval evaluation: batched feature extraction and chunked top-k recall.

``recall_at_k`` is a pure function of features and labels. ``evaluate`` takes a model and a
dataset: it encodes every needed image once, composes the queries from the cached image features
when the model allows it (TIRG re-encoded each query image), and ranks the gallery by cosine
similarity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch_function import normalize_images

GALLERY_CHUNK_BYTES = 256 * 2**20


def _as_tensor(x, dtype=None) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


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
    similarity. query_target_labels (Q,) and gallery_labels (N,): integer labels; every gallery
    item with the query's label counts as a hit. exclude_indices (Q,): a gallery index to drop
    for each query (its own source image), or -1. Queries are scored ``chunk_size`` at a time
    with ``topk`` (default: chunks of at most 256 MB of similarities), so memory stays bounded.
    Runs on the gallery's device. Returns {k: recall in [0, 1]}.
    """
    gallery = F.normalize(_as_tensor(gallery_features).float(), dim=1)
    device = gallery.device
    queries = F.normalize(_as_tensor(query_features).float().to(device), dim=1)
    query_labels = _as_tensor(query_target_labels, torch.long).to(device)
    gallery_labels = _as_tensor(gallery_labels, torch.long).to(device)
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if query_labels.shape[0] != n_queries or gallery_labels.shape[0] != n_gallery:
        raise ValueError(
            f"{n_queries} query features but {query_labels.shape[0]} labels, or "
            f"{n_gallery} gallery features but {gallery_labels.shape[0]} labels"
        )
    if exclude_indices is not None:
        exclude_indices = _as_tensor(exclude_indices, torch.long).to(device)
    ks = sorted(set(int(k) for k in ks))
    if n_queries == 0:
        return {k: 0.0 for k in ks}
    max_k = min(ks[-1], n_gallery)
    if chunk_size is None:
        chunk_size = max(1, GALLERY_CHUNK_BYTES // (4 * max(n_gallery, 1)))
    hits = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        similarities = queries[start:stop] @ gallery.t()
        if exclude_indices is not None:
            excluded = exclude_indices[start:stop]
            rows = torch.nonzero(excluded >= 0).squeeze(1)
            similarities[rows, excluded[rows]] = float("-inf")
        top = similarities.topk(max_k, dim=1).indices
        match = gallery_labels[top] == query_labels[start:stop, None]
        if exclude_indices is not None:  # an excluded item can still fill a slot when k >= N
            match &= top != exclude_indices[start:stop, None]
        for i, k in enumerate(ks):
            hits[i] += match[:, :k].any(dim=1).sum()
    return {k: hits[i].item() / n_queries for i, k in enumerate(ks)}


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
) -> dict:
    """Recall@k of ``queries`` against the gallery ``gallery_ids`` of ``dataset``.

    A query dict has ``source_img_id``, ``mod['str']`` and ``target_caption``; a hit is a gallery
    image whose label (``dataset.gallery_labels()``) equals the query's. With ``exclude_source``
    the query's own source image is removed from its ranking. Returns ``{"recall": {k: frac},
    "seconds_features": s, "seconds_ranking": s}``.
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
        query_labels, gallery_labels = _label_ids(
            [dataset.query_label(q) for q in queries], [labels[i] for i in gallery_ids]
        )
        exclude = None
        if exclude_source:
            position = {img_id: i for i, img_id in enumerate(gallery_ids)}
            exclude = np.asarray([position.get(s, -1) for s in source_ids], dtype=np.int64)
        recall = recall_at_k(
            query_features,
            gallery_features,
            query_labels,
            gallery_labels,
            ks,
            exclude_indices=exclude,
        )
        seconds_ranking = time.perf_counter() - start
    finally:
        model.train(was_training)
    return {
        "recall": recall,
        "seconds_features": seconds_features,
        "seconds_ranking": seconds_ranking,
    }


def test(model, dataset, batch_size: int, device: torch.device, num_workers: int = 0) -> dict:
    """TIRG's test protocol: every test query against every image of the split."""
    return evaluate(
        model,
        dataset,
        dataset.get_test_queries(),
        range(len(dataset.imgs)),
        exclude_source=True,
        ks=dataset.recall_ks,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
    )


def test_on_training_queries(
    model, dataset, queries: list[dict], batch_size: int, device: torch.device, num_workers: int = 0
) -> dict:
    """TIRG's approximation of training accuracy: a fixed sample of training queries ranked
    against the gallery of their own target images (one entry per query, as TIRG builds it)."""
    return evaluate(
        model,
        dataset,
        queries,
        [q["target_img_id"] for q in queries],
        exclude_source=False,
        ks=dataset.recall_ks,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
    )
