"""Retrieval evaluation: batched feature extraction, chunked top-k ranking and recall.

``recall_at_k`` is a pure function of features and labels. ``evaluate`` takes a model and a
dataset: it encodes every needed image once, composes the queries from the cached image features
when the model allows it (TIRG re-encoded each query image), and ranks the gallery by cosine
similarity.

Ranking rule (ties). The gallery is ordered by descending cosine similarity; items with exactly
equal similarity are ordered by ascending gallery index, i.e. the order of a *stable* sort of
``-similarity``. Exact ties are real: duplicate gallery images (CSS's ``.dup`` file, a gallery
of training targets that repeats an image) give identical features. TIRG used
``np.argsort(-sims)`` (quicksort), whose order among ties is unspecified. The exact path follows
the rule everywhere: ``topk`` fetches one item more than needed, the list is re-sorted by
(similarity, index), and a row whose last fetched item ties with the k-th is re-ranked from its
full similarity row (rare outside galleries with repeated images). An excluded item (a query's
own source image) is never a hit and never takes a slot, even when k covers the whole gallery.

Speed. Where the hardware multiplies bfloat16 natively (GPUs, CPUs with AVX512-BF16 or AMX),
recall first scores in bf16, about 4x cheaper than fp32 on such a CPU, on a centered gallery
with per-query row offsets that keep the rounded numbers small (``_BF16Gallery``). A rigorous
bound on the rounding error (``_screen_error_bound``) tells which queries' hits the rounding
cannot change, by counting the items above two thresholds around the best hit's score
(``_screen_chunk``: no sort); close races are settled from the fp32 similarities of their few
candidates (``_settle_by_candidates``), and any query still open is ranked again in fp32, so
the recall equals the fp32 path's (``precision='fp32'``) exactly. A query whose hits rank far
down is settled from a sample of the gallery alone (``_sample_misses``): if the sample already
holds k_max items surely above every hit, the rest of the gallery need not be scored.

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
BACKENDS = ("exact", "faiss")
QUALITATIVE_QUERIES = 6  # test queries whose top-10 lists ``test`` returns for the figure
QUALITATIVE_K = 10
TIE_ROWS = 256  # rows re-ranked at once when the k-th place ties with an unfetched item
PRECISIONS = ("auto", "fp32", "bf16")
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand)
U_FP32 = 2.0**-24


def _as_tensor(x, dtype=None) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _check_finite(features: torch.Tensor, name: str) -> None:
    # max and min propagate NaN (and show an inf): two fast reductions instead of a bool pass.
    if features.numel() and not bool(
        torch.isfinite(features.amax()) & torch.isfinite(features.amin())
    ):
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


def _exact_top_k_chunks(queries, gallery, k, exclude, chunk_size, desc):
    """Yield (start, stop, top): top (C, min(k, N)) gallery indices in rank order (the module's
    tie rule); an excluded item has similarity -inf, so it can only fill the last slots."""
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    k = min(k, n_gallery)
    fetch = min(k + 1, n_gallery)  # one more: tells whether the k-th item ties with an unseen one
    starts = range(0, n_queries, chunk_size)
    buffer = _similarity_buffer(min(chunk_size, n_queries), gallery)
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 8):
        stop = min(start + chunk_size, n_queries)
        similarities = _similarities(queries[start:stop], gallery, buffer)
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


def _similarity_buffer(rows: int, gallery: torch.Tensor) -> torch.Tensor:
    """One (rows, N) similarity matrix, reused by every chunk. A fresh one per chunk costs more
    than its products on CPU: a matrix this large is mapped anew by the allocator each time and
    every page faults on first write (about a third of the bf16 screen's time at the Fashion200k
    shape)."""
    return torch.empty(rows, gallery.shape[0], dtype=gallery.dtype, device=gallery.device)


def _similarities(queries, gallery, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """queries (C, D) @ gallery (N, D)^T, written into the first C rows of ``buffer`` if given."""
    if buffer is None:
        buffer = _similarity_buffer(queries.shape[0], gallery)
    out = buffer[: queries.shape[0]]
    with torch.no_grad():
        torch.matmul(queries, gallery.t(), out=out)
    return out


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


def _faiss_top_k_chunks(queries, gallery, k, exclude, chunk_size, faiss_index, desc):
    """As ``_exact_top_k_chunks`` with a FAISS inner-product index (CPU). Excluded items are
    dropped from the lists rather than ranked last; -1 marks a slot FAISS left empty."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "backend='faiss' needs the optional package faiss-cpu (pip install faiss-cpu)"
        ) from None
    spec, _, params = faiss_index.partition("|")
    gallery_np = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.index_factory(gallery_np.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(gallery_np)
    index.add(gallery_np)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    k = min(k, n_gallery)
    fetch = min(k + (exclude is not None), n_gallery)
    starts = range(0, n_queries, chunk_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 8):
        stop = min(start + chunk_size, n_queries)
        chunk = np.ascontiguousarray(queries[start:stop].detach().cpu().numpy(), dtype=np.float32)
        values, top = index.search(chunk, fetch)
        values, top = _order_ties_by_index(torch.from_numpy(values), torch.from_numpy(top))
        values[top < 0] = float("-inf")  # empty slots go last
        values, top = _order_ties_by_index(values, top)
        if exclude is not None:
            # Move the excluded item (if listed) to the end, then keep k slots.
            excluded = exclude[start:stop].cpu()
            drop = top == excluded[:, None]
            order = drop.to(torch.int8).argsort(dim=1, stable=True)
            top = top.gather(1, order)
            top[drop.gather(1, order)] = -1
        yield start, stop, top[:, :k].to(queries.device)


def _prepare(query_features, gallery_features, exclude_indices, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def _top_k_chunks(queries, gallery, k, exclude, chunk_size, backend, faiss_index, desc):
    if chunk_size is None:
        chunk_size = _default_chunk_size(gallery.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend == "faiss":
        return _faiss_top_k_chunks(queries, gallery, k, exclude, chunk_size, faiss_index, desc)
    return _exact_top_k_chunks(queries, gallery, k, exclude, chunk_size, desc)


def top_k_gallery(
    query_features,
    gallery_features,
    k: int,
    exclude_indices=None,
    chunk_size: int | None = None,
    backend: str = "exact",
    faiss_index: str = "Flat",
) -> torch.Tensor:
    """The k most similar gallery items of every query, in rank order (the module's tie rule).

    query_features (Q, D), gallery_features (N, D): tensors or arrays, compared by cosine
    similarity. exclude_indices (Q,): a gallery index to rank last for each query, or -1.
    Returns a (Q, min(k, N)) long tensor of gallery indices, on the gallery's device.
    """
    queries, gallery, exclude = _prepare(query_features, gallery_features, exclude_indices, backend)
    if queries.shape[0] == 0 or gallery.shape[0] == 0:
        return torch.zeros(queries.shape[0], 0, dtype=torch.long, device=gallery.device)
    chunks = _top_k_chunks(
        queries, gallery, k, exclude, chunk_size, backend, faiss_index, "rank gallery"
    )
    return torch.cat([top for _, _, top in chunks])


def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):
            pass
    return False


# The screen's counts are exact below 256 (on GPUs they are bf16 sums: a count at or above 256
# rounds to at least 256), so it decides recall@k for k up to this.
SCREEN_K_MAX = 255
SCREEN_MIN_GALLERY = 64  # below this the fp32 ranking is as cheap
# The sample pass (``_sample_misses``) scores every SAMPLE_STRIDE-th gallery item first; it runs
# where the sample holds at least SAMPLE_MIN_PER_K items per place of the largest k, and stops
# for the remaining chunks once it settles fewer than SAMPLE_MIN_SETTLED of a chunk's rows.
SAMPLE_STRIDE = 16
SAMPLE_MIN_PER_K = 4
SAMPLE_MIN_SETTLED = 0.1
# It also stops where a chunk's hits outnumber this share of its sampled scores: it needs the
# screen score of every hit, computed pair by pair at ~200x the cost of a product's score.
SAMPLE_MAX_HIT_SHARE = 1 / 64


def _use_bf16_screen(precision: str, device: torch.device, backend: str, n_gallery: int, k_max):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend != "exact" or precision == "fp32":
        return False
    if n_gallery < SCREEN_MIN_GALLERY or k_max > SCREEN_K_MAX:
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_fast_bf16()


class _BF16Gallery:
    """The gallery for the bf16 screen, with the norms that bound its rounding error.

    Two shifts keep the rounded numbers small where it matters; neither changes any ranking,
    because each moves a query's whole row of similarities by one constant:
    - the gallery is centered on its mean m (s_ij = q_i.(g_j - m) + q_i.m), so features that
      share a common direction (an untrained model's nearly equal ones, for instance) are
      rounded relative to their spread rather than to their unit norm;
    - each row is offset by c_i, a value near where the row is decided (just below its best
      hit's similarity; without a hit, the best similarity to a fixed set of evenly spaced
      gallery probes): the gallery gets a constant coordinate 1 and the query the coordinate
      -c_i, so the product computes q_i.(g_j - m) - c_i in fp32 before the bf16 output
      rounding, whose error is then relative to |s_ij - c_i|, small where it matters.
    """

    PROBES = 256
    BLOCK = 4096  # gallery rows prepared at once (small temporaries: see PAIR_BLOCK)

    def __init__(self, gallery: torch.Tensor):
        n, d = gallery.shape
        self.dim = d
        self.mean = gallery.mean(dim=0)
        self.features = torch.empty(n, d + 1, dtype=torch.bfloat16, device=gallery.device)
        self.features[:, d] = 1.0
        rounding, rounded, centered_norms = [], [], []
        for start in range(0, n, self.BLOCK):
            centered = gallery[start : start + self.BLOCK] - self.mean  # g'_j
            block = self.features[start : start + self.BLOCK, :d]
            block.copy_(centered)
            rounding.append((centered - block.float()).norm(dim=1))  # ||g'_j - bf16(g'_j)||
            rounded.append(block.float().norm(dim=1))
            centered_norms.append(centered.norm(dim=1))
        self.rounding_norm_max = torch.cat(rounding).max()
        self.rounded_norm_max = torch.cat(rounded).max()
        self.centered_norm_max = torch.cat(centered_norms).max()
        self.gallery = gallery
        self.norms = gallery.norm(dim=1)
        self.norm_max = self.norms.max()
        probes = torch.linspace(0, n - 1, min(n, self.PROBES), device=gallery.device).long()
        self.probes = gallery[probes] - self.mean
        self.sample_stride = SAMPLE_STRIDE
        self.sample = self.features[:: self.sample_stride].contiguous()  # see _sample_misses

    def round_queries(self, queries: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(C, D) fp32 and their row offsets c (C,) -> (C, D + 1) bf16: [q, -c]."""
        return torch.cat([queries, -offsets[:, None]], dim=1).to(torch.bfloat16)

    def probe_offsets(self, queries: torch.Tensor) -> torch.Tensor:
        """(C,): each query's best centered similarity to the probes, a guess of its row's top."""
        return (queries @ self.probes.t()).amax(dim=1)


def _bf16_similarities(rounded_queries, rounded_gallery, buffer=None) -> torch.Tensor:
    """(C, D) @ (N, D)^T in bf16 with fp32 accumulation (cuBLAS may otherwise reduce in bf16,
    which the error bound does not cover), into ``buffer`` if given."""
    cuda = rounded_queries.device.type == "cuda"
    if cuda:
        allowed = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return _similarities(rounded_queries, rounded_gallery, buffer)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = allowed


def _screen_error_bound(queries, rounded_queries, gallery: _BF16Gallery, largest):
    """eps_i >= |(s~_ij - s_ij) - o_i| for every gallery item j whose screen score s~_ij has
    |s~_ij| <= largest_i (or is below one that has), o_i a constant of the row: (C,). With
    largest 0 it is the part E_i that does not grow with |s~| (the screen adds u/(1 - u) |s~|).

    s~_ij = bf16(q~.g~'_j - c~_i) (see ``_BF16Gallery``) and s_ij = fp32(q.g_j). With
    g'_j = fp32(g_j - m) = g_j - m + r_j, |r_j| <= u32 |g_j - m|, s~ - s equals o_i = -(q.m + c~_i)
    plus (q~ - q).g~' + q.(g~' - g') + q.r_j + both fp32 accumulations + the output rounding,
    bounded by ||q~ - q|| ||g~'|| + ||q|| ||g~' - g'|| (Cauchy-Schwarz), u32 ||q|| ||g'||,
    (D + 1) u32 (||q~|| ||g~'|| + |c~|) for the bf16 product's fp32 sum, D u32 ||q|| ||g|| for
    s's, and u/(1 - u) |s~| for rounding s~ to bf16; 1% and a tiny absolute term cover the
    rounding of this sum and flushed subnormals. Comparisons within a row ignore o_i.
    """
    rounded = rounded_queries[:, : gallery.dim].float()
    offset = rounded_queries[:, gallery.dim].float().abs()
    query_norm = queries.norm(dim=1)
    accumulation = (gallery.dim + 1) * U_FP32 * (
        rounded.norm(dim=1) * gallery.rounded_norm_max + offset
    ) + gallery.dim * U_FP32 * query_norm * gallery.norm_max
    return (
        (queries - rounded).norm(dim=1) * gallery.rounded_norm_max
        + query_norm * (gallery.rounding_norm_max + U_FP32 * gallery.centered_norm_max)
        + accumulation
        + U_BF16 / (1 - U_BF16) * largest
    ) * 1.01 + 1e-30 * gallery.dim


class _LabelIndex:
    """The gallery items of each label, for listing every query's hits without a Q x N pass."""

    def __init__(self, gallery_labels: torch.Tensor):
        self.labels = gallery_labels
        self.order = torch.argsort(gallery_labels, stable=True)
        self.sorted_labels = gallery_labels[self.order]

    def hits(self, query_labels: torch.Tensor, exclude) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, items): every (query row, gallery item) pair with the query's label, the
        query's excluded item left out; as two flat long tensors."""
        first = torch.searchsorted(self.sorted_labels, query_labels)
        counts = torch.searchsorted(self.sorted_labels, query_labels, right=True) - first
        device = counts.device
        rows = torch.repeat_interleave(torch.arange(len(query_labels), device=device), counts)
        row_start = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(rows), device=device) - row_start[rows]
        items = self.order[first[rows] + position]
        if exclude is not None:
            keep = items != exclude[rows]
            rows, items = rows[keep], items[keep]
        return rows, items


def _bf16_bits(threshold: torch.Tensor, direction: str) -> torch.Tensor:
    """The bf16 bit patterns (int16) of positive fp32 thresholds, rounded 'down' or 'up' (to the
    nearest bf16 number <= or >= each). For positive bf16 numbers the integer order of the bit
    patterns is the numeric order, and every negative number (-inf included) has a negative
    pattern: comparing patterns as int16 compares the numbers."""
    rounded = threshold.to(torch.bfloat16)
    bits = rounded.view(torch.int16).clone()
    if direction == "down":
        bits -= (rounded.float() > threshold).to(torch.int16)
    else:
        bits += (rounded.float() < threshold).to(torch.int16)
    return bits


class _ScreenBuffers:
    """The reused (C, N) similarity and mask matrices of the screen, and the ones it counts with;
    ``sample``: the same for the gallery sample (``_sample_misses``), None where it is not used."""

    def __init__(self, rows: int, features: torch.Tensor, sample: torch.Tensor | None = None):
        device = features.device
        self.sample = None if sample is None else _ScreenBuffers(rows, sample)
        self.similarities = _similarity_buffer(rows, features)
        self.mask = torch.empty(self.similarities.shape, dtype=torch.int16, device=device)
        n = features.shape[0]
        self.int8_counts = _int8_counts(device)
        if self.int8_counts:  # the int16 0/1 mask read as 2N int8 bytes, half of them 0
            self.ones = torch.ones(2 * n, 8, dtype=torch.int8, device=device)
        else:
            self.ones = torch.ones(1, n, dtype=torch.bfloat16, device=device)


def _int8_counts(device: torch.device) -> bool:
    """Whether the screen sums its masks with torch._int_mm (any shape on CPU; CUDA's needs
    multiples of 8 and more than 16 rows) rather than a bf16 product."""
    return device.type == "cpu"


_BF16_ONE_BITS = 0x3F80  # 1.0 in bfloat16
OFFSET_HITS = 64
CANDIDATE_LIMIT = 1024  # rows with more non-hit candidates than this go straight to fp32


def _count_at_least(scores_bits, thresholds_bits, buffers: _ScreenBuffers, strict: bool, skip=None):
    """(C,) float: per row, how many scores are >= (strict: >) the row's threshold (exact below
    256; at least 256 when the count is). scores_bits (C, N) int16 views of bf16 scores,
    thresholds_bits (C,) int16 of positive bf16 numbers; skip: (rows, items) not to count.
    torch's int and bool reductions are slow on CPU, so the 0/1 mask is summed by a product
    with ones: int8 on CPU (exact), bf16 elsewhere."""
    mask = buffers.mask[: scores_bits.shape[0]]
    compare = torch.gt if strict else torch.ge
    compare(scores_bits, thresholds_bits[:, None], out=mask)  # 0 / 1
    if skip is not None:
        mask[skip] = 0
    if buffers.int8_counts:
        return torch._int_mm(mask.view(torch.int8), buffers.ones)[:, 0].float()
    mask.mul_(_BF16_ONE_BITS)  # 0 / 1.0 as bf16 bit patterns
    return _bf16_similarities(mask.view(torch.bfloat16), buffers.ones).float().squeeze(1)


# (query, item) pairs whose similarity is computed at once (``_settle_by_candidates``,
# ``_hit_dots``): a few MB of temporaries, which the C allocator keeps for the next block
# (blocks of tens of MB are mapped afresh and page-faulted every time).
PAIR_BLOCK = 512


def _settle_by_candidates(
    queries,
    gallery: _BF16Gallery,
    scores_bits,
    low_bits,
    query_labels,
    index: _LabelIndex,
    ks_tensor,
):
    """Second look at rows the counts left open: (certain_in, certain_out), each (R, len(ks)).

    All the arguments are of the R rows. Items scoring below the low threshold rank below the
    best-scoring hit (``_screen_chunk``), so only the candidates at or above it can matter.
    Their similarities x are computed directly in fp32: |x - s| <= 2 D u32 ||q|| ||g|| = d,
    s the fp32 ranking's value. With x_lo/x_hi the largest x - d / x + d of a hit, a non-hit
    with x + d < x_lo ranks below the first hit and one with x - d > x_hi above every hit;
    so the counts of the two kinds settle recall@k with margins of ~1e-4 instead of bf16's.
    """
    n_rows = scores_bits.shape[0]
    device = scores_bits.device
    rows, items = (scores_bits >= low_bits[:, None]).nonzero(as_tuple=True)
    x = torch.empty(len(rows), device=device)
    for start in range(0, len(rows), PAIR_BLOCK):
        r, j = rows[start : start + PAIR_BLOCK], items[start : start + PAIR_BLOCK]
        x[start : start + len(r)] = (queries[r] * gallery.gallery[j]).sum(dim=1)
    bound = 2.02 * queries.shape[1] * U_FP32 * queries.norm(dim=1)[rows] * gallery.norms[items]
    bound += 1e-30
    is_hit = index.labels[items] == query_labels[rows]
    x_lo = _row_max((x - bound)[is_hit], rows[is_hit], n_rows)
    x_hi = _row_max((x + bound)[is_hit], rows[is_hit], n_rows)
    not_hit = ~is_hit
    may_beat = torch.bincount(rows[not_hit & (x + bound >= x_lo[rows])], minlength=n_rows).float()
    surely_beat = torch.bincount(rows[not_hit & (x - bound > x_hi[rows])], minlength=n_rows)
    certain_in = may_beat[:, None] < ks_tensor
    certain_out = surely_beat.float()[:, None] >= ks_tensor
    return certain_in, certain_out


def _row_max(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,): the largest of ``values`` in each row (``rows``: their rows); -inf where none."""
    best = torch.full((n_rows,), float("-inf"), device=values.device)
    return best.scatter_reduce_(0, rows, values, "amax")


def _pairs_of(row_subset: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, n_rows: int):
    """The (row, item) pairs whose row is in ``row_subset``, renumbered by their place in it."""
    position = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
    position[row_subset] = torch.arange(len(row_subset), device=rows.device)
    listed = position[rows] >= 0
    return position[rows[listed]], items[listed]


def _screen_chunk(queries, gallery: _BF16Gallery, exclude, labels, ks, buffers=None):
    """Decide recall@k from bfloat16 scores wherever the rounding cannot change the answer.

    queries (C, D) fp32, normalized; exclude (C,) or None; labels {name: (query labels (C,),
    _LabelIndex of the gallery labels)}, the first label set sets the row offsets; buffers: a
    ``_ScreenBuffers`` of >= C rows to reuse. Returns ({name: hits (C, len(ks)) bool},
    uncertain (C,) bool): for every row that is not uncertain the hits equal those of the fp32
    ranking.

    Why: |s~ - s - o_i| <= E_i + u'|s~| for every item of query i, where s~ is the screen score,
    s the fp32 similarity, o_i a constant of the row and u' = u/(1 - u) the output rounding
    (``_screen_error_bound``). Let b be the largest s~ of a hit. Every hit has s - o_i <=
    b + u'|b| + E_i, and x - u'|x| grows with x, so an item with s~ > t_hi, t_hi > 0 solving
    t (1 - u') = b + u'|b| + 2 E_i, ranks above every hit: if k items do, no hit is in the top
    k. Likewise an item with s~ < t_lo, t_lo (1 + u') = b - u'|b| - 2 E_i, ranks below the hit
    of score b; so if fewer than k non-hits have s~ >= t_lo, the first hit in the fp32 order
    (preceded by non-hits only, all of them above that hit) is in the top k. The offsets put b
    a few E_i above 0, so that both thresholds are positive and their counts run on the int16
    bit patterns; a row where a threshold is not positive, or a k neither test settles (after
    ``_settle_by_candidates``), is uncertain and is ranked again in fp32. With
    ``buffers.sample`` set, rows that the gallery sample alone shows to miss every k
    (``_sample_misses``) are settled before the whole gallery is scored.
    """
    n_rows = queries.shape[0]
    device = queries.device
    buffers = buffers or _ScreenBuffers(n_rows, gallery.features)
    hit_lists = {
        name: index.hits(query_labels, exclude) for name, (query_labels, index) in labels.items()
    }
    pairs = sum(len(rows) for rows, _ in hit_lists.values())
    if buffers.sample is not None and pairs > SAMPLE_MAX_HIT_SHARE * n_rows * len(gallery.sample):
        buffers.sample = None  # too many hits to score one by one: later chunks skip it too
    sampling = buffers.sample is not None
    rounded_queries, errors, dots = _offset_queries(
        queries, gallery, *next(iter(hit_lists.values())), all_hits=sampling
    )
    if not sampling:
        return _screen_rows(
            queries, rounded_queries, errors, gallery, exclude, labels, hit_lists, ks, buffers
        )
    missed = _sample_misses(
        rounded_queries, errors, gallery, exclude, hit_lists, dots, ks[-1], buffers.sample
    )
    if missed.float().mean() < SAMPLE_MIN_SETTLED:
        buffers.sample = None  # the sample no longer pays for itself: later chunks skip it
    hits = {name: torch.zeros(n_rows, len(ks), dtype=torch.bool, device=device) for name in labels}
    uncertain = torch.zeros(n_rows, dtype=torch.bool, device=device)
    open_rows = torch.nonzero(~missed).squeeze(1)
    if len(open_rows):
        open_lists = {
            name: _pairs_of(open_rows, rows, items, n_rows)
            for name, (rows, items) in hit_lists.items()
        }
        open_hits, uncertain[open_rows] = _screen_rows(
            queries[open_rows],
            rounded_queries[open_rows],
            errors[open_rows],
            gallery,
            None if exclude is None else exclude[open_rows],
            {name: (q[open_rows], index) for name, (q, index) in labels.items()},
            open_lists,
            ks,
            buffers,
        )
        for name, h in open_hits.items():
            hits[name][open_rows] = h
    return hits, uncertain


def _offset_queries(queries, gallery: _BF16Gallery, rows, items, all_hits: bool):
    """(rounded queries [q, -c] (C, D + 1) with the row offsets c of ``_BF16Gallery``, the rows'
    error bounds E (C,), the dots of the (rows, items) hit pairs or None).

    c is a few error bounds below the best dot of a hit (rows, items: the first label set's
    hits; of each row's first OFFSET_HITS, which bounds the work and only lowers c, unless
    ``all_hits``, which also returns the dots of every pair, for ``_best_hit_scores``)."""
    n_rows = queries.shape[0]
    device = queries.device
    rounded_queries = gallery.round_queries(queries, torch.zeros(n_rows, device=device))
    errors = _screen_error_bound(queries, rounded_queries, gallery, 0.0)
    if not all_hits:
        first = torch.searchsorted(rows, rows)  # rows is sorted: where each row's hits begin
        few = torch.arange(len(rows), device=device) - first < OFFSET_HITS
        rows, items = rows[few], items[few]
    dots = _hit_dots(rounded_queries, gallery, rows, items)
    best = _row_max(dots, rows, n_rows)
    offsets = best - 4 * errors
    no_hit = torch.nonzero(best == float("-inf")).squeeze(1)
    if len(no_hit):
        offsets[no_hit] = gallery.probe_offsets(queries[no_hit])
    rounded_queries[:, -1] = -offsets  # the query coordinates are rounded already
    errors = _screen_error_bound(queries, rounded_queries, gallery, 0.0)
    return rounded_queries, errors, dots if all_hits else None


def _hit_dots(rounded_queries, gallery: _BF16Gallery, rows, items) -> torch.Tensor:
    """(P,): q~ . g~' over the D feature coordinates (the offset's left out) of each (row, item)
    pair, summed in fp32 from the bf16 numbers, whose products fp32 holds exactly."""
    d = gallery.dim
    dots = torch.empty(len(rows), device=rounded_queries.device)
    for start in range(0, len(rows), PAIR_BLOCK):
        r, j = rows[start : start + PAIR_BLOCK], items[start : start + PAIR_BLOCK]
        products = rounded_queries[r, :d].float() * gallery.features[j, :d].float()
        dots[start : start + len(r)] = products.sum(dim=1)
    return dots


def _best_hit_scores(rounded_queries, rows, dots) -> torch.Tensor:
    """(C,): each row's largest screen score of a hit (-inf: no hit) from its pairs' dots:
    bf16(dot - c~), the offset's term added last. That is one fp32 summation order of the
    screen's sum, and its error bound holds for any order, so these scores obey the bound of
    the matrix product's."""
    scores = (dots + rounded_queries[rows, -1].float()).to(torch.bfloat16).float()
    return _row_max(scores, rows, rounded_queries.shape[0])


def _thresholds(b: torch.Tensor, errors: torch.Tensor):
    """(has_hit, usable, high, low), each (C,), from the best hit's screen score b (-inf: no
    hit) and the error bounds E: the thresholds t_hi and t_lo of ``_screen_chunk`` (1 where a
    row cannot use them: no hit, or t_lo not positive)."""
    u = U_BF16 / (1 - U_BF16)
    has_hit = b > float("-inf")
    b = torch.where(has_hit, b, torch.zeros_like(b))
    # 1e-5: the fp32 rounding of the thresholds themselves.
    high = (b + u * b.abs() + 2 * errors) / (1 - u) * (1 + 1e-5) + 1e-30
    low = (b - u * b.abs() - 2 * errors) / (1 + u) * (1 - 1e-5)
    usable = has_hit & (low > 0)
    low = torch.where(usable, low, torch.ones_like(low))
    high = torch.where(usable, high, torch.ones_like(high))
    return has_hit, usable, high, low


def _sample_misses(
    rounded_queries, errors, gallery: _BF16Gallery, exclude, hit_lists, first_dots, k_max, buffers
):
    """(C,) bool: rows that certainly have no hit among their first k_max items, under every
    label set, decided from the gallery sample (every SAMPLE_STRIDE-th item) alone.

    An item whose screen score exceeds the row's t_hi (``_screen_chunk``, with b the best hit's
    score from ``_best_hit_scores``) ranks above every hit in the fp32 order, so it is no hit
    itself; if k_max sampled items do, the rest of the gallery cannot bring a hit into the top
    k_max. Queries whose hits rank far down (unrelated or badly matched ones) are thereby
    settled for a 1/SAMPLE_STRIDE of the products; the others go on to the whole gallery.
    first_dots: the dots of the first label set's hits (``_offset_queries``); buffers: the
    sample's ``_ScreenBuffers``.
    """
    n_rows = rounded_queries.shape[0]
    scores = _bf16_similarities(rounded_queries, gallery.sample, buffers.similarities)
    if exclude is not None:
        stride = gallery.sample_stride
        sampled = torch.nonzero((exclude >= 0) & (exclude % stride == 0)).squeeze(1)
        scores[sampled, exclude[sampled] // stride] = float("-inf")
    missed = torch.ones(n_rows, dtype=torch.bool, device=rounded_queries.device)
    for i, (rows, items) in enumerate(hit_lists.values()):
        dots = first_dots if i == 0 else _hit_dots(rounded_queries, gallery, rows, items)
        b = _best_hit_scores(rounded_queries, rows, dots)
        has_hit, usable, high, _ = _thresholds(b, errors)
        beat = _count_at_least(scores.view(torch.int16), _bf16_bits(high, "up"), buffers, True)
        missed &= ~has_hit | (usable & (beat >= k_max))
    return missed


def _screen_rows(
    queries, rounded_queries, errors, gallery, exclude, labels, hit_lists, ks, buffers
):
    """``_screen_chunk`` on the whole gallery, the offsets and hit lists given."""
    n_rows = queries.shape[0]
    device = queries.device
    scores = _bf16_similarities(rounded_queries, gallery.features, buffers.similarities)
    if exclude is not None:
        excluded = torch.nonzero(exclude >= 0).squeeze(1)
        scores[excluded, exclude[excluded]] = float("-inf")
    scores_bits = scores.view(torch.int16)
    ks_tensor = torch.as_tensor(ks, device=device, dtype=torch.float32)[None, :]
    uncertain = torch.zeros(n_rows, dtype=torch.bool, device=device)
    hits = {}
    for name, (rows, items) in hit_lists.items():
        b = _row_max(scores[rows, items].float(), rows, n_rows)
        has_hit, usable, high, low = _thresholds(b, errors)
        surely_beat = _count_at_least(scores_bits, _bf16_bits(high, "up"), buffers, strict=True)
        certain_out = ~has_hit[:, None] | (usable[:, None] & (surely_beat[:, None] >= ks_tensor))
        # Non-hits that may beat the best hit, counted where some k is not yet out.
        open_rows = torch.nonzero(usable & ~certain_out.all(dim=1)).squeeze(1)
        may_beat = torch.full((n_rows,), float("inf"), device=device)
        if len(open_rows) > n_rows // 2:
            may_beat = _count_at_least(
                scores_bits, _bf16_bits(low, "down"), buffers, strict=False, skip=(rows, items)
            )
        elif len(open_rows):
            skip = _pairs_of(open_rows, rows, items, n_rows)
            may_beat[open_rows] = _count_at_least(
                scores_bits[open_rows], _bf16_bits(low[open_rows], "down"), buffers, False, skip
            )
        certain_in = usable[:, None] & (may_beat[:, None] < ks_tensor)
        # Rows left open with few candidates: a second look at exact similarities.
        still_open = usable & (~certain_in & ~certain_out).any(dim=1)
        todo = torch.nonzero(still_open & (may_beat <= CANDIDATE_LIMIT)).squeeze(1)
        if len(todo):
            query_labels, index = labels[name]
            certain_in[todo], certain_out[todo] = _settle_by_candidates(
                queries[todo],
                gallery,
                scores_bits[todo],
                _bf16_bits(low[todo], "down"),
                query_labels[todo],
                index,
                ks_tensor,
            )
        uncertain |= (~certain_in & ~certain_out).any(dim=1)
        hits[name] = certain_in
    return hits, uncertain


def _hits_from_top(top, exclude, labels, ks) -> dict[str, torch.Tensor]:
    """{name: (R, len(ks)) bool}: whether a hit is among the first k listed items of each row.

    top (R, K) gallery indices in rank order (-1: empty slot); exclude (R,) or None."""
    listed = top >= 0
    if exclude is not None:
        listed &= top != exclude[:, None]
    # A slot counts for k when fewer than k listed items precede it.
    position = listed.cumsum(dim=1)
    safe_top = top.clamp_min(0)
    out = {}
    for name, (query_labels, gallery_labels) in labels.items():
        match = listed & (gallery_labels[safe_top] == query_labels[:, None])
        out[name] = torch.stack([(match & (position <= k)).any(dim=1) for k in ks], dim=1)
    return out


def recall_at_k_label_sets(
    query_features,
    gallery_features,
    label_sets: Mapping[str, tuple],
    ks: Sequence[int],
    exclude_indices=None,
    chunk_size: int | None = None,
    backend: str = "exact",
    faiss_index: str = "Flat",
    precision: str = "auto",
) -> dict[str, dict[int, float]]:
    """``recall_at_k`` under several labelings of the same queries and gallery, ranked once.

    label_sets: {name: (query_target_labels (Q,), gallery_labels (N,))}, integer labels.
    Returns {name: {k: recall in [0, 1]}}.
    """
    queries, gallery, exclude = _prepare(query_features, gallery_features, exclude_indices, backend)
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

    def add(rows_hits):
        for name, h in rows_hits.items():
            hits[name] += h.sum(dim=0)

    def rows_of(rows):
        exclude_rows = None if exclude is None else exclude[rows]
        label_rows = {n: (q[rows], g) for n, (q, g) in labels.items()}
        return exclude_rows, label_rows

    if _use_bf16_screen(precision, device, backend, n_gallery, ks[-1]):
        rounded_gallery = _BF16Gallery(gallery)
        indexes = {name: _LabelIndex(g) for name, (_, g) in labels.items()}
        size = chunk_size or _default_chunk_size(n_gallery)
        starts = range(0, n_queries, size)
        sampled = len(rounded_gallery.sample) >= SAMPLE_MIN_PER_K * ks[-1]
        buffers = _ScreenBuffers(
            min(size, n_queries),
            rounded_gallery.features,
            rounded_gallery.sample if sampled else None,
        )
        for start in tqdm(starts, desc="recall", leave=False, disable=len(starts) < 8):
            rows = torch.arange(start, min(start + size, n_queries), device=device)
            exclude_rows, label_rows = rows_of(rows)
            indexed = {name: (q, indexes[name]) for name, (q, _) in label_rows.items()}
            screened, uncertain = _screen_chunk(
                queries[rows], rounded_gallery, exclude_rows, indexed, ks, buffers
            )
            add({name: h[~uncertain] for name, h in screened.items()})
            again = rows[uncertain]
            if len(again):  # rank these rows in fp32
                exclude_rows, label_rows = rows_of(again)
                chunks = _exact_top_k_chunks(
                    queries[again], gallery, ks[-1], exclude_rows, len(again), None
                )
                for _, _, top in chunks:
                    add(_hits_from_top(top, exclude_rows, label_rows, ks))
    else:
        chunks = _top_k_chunks(
            queries, gallery, ks[-1], exclude, chunk_size, backend, faiss_index, "recall"
        )
        for start, stop, top in chunks:
            exclude_rows, label_rows = rows_of(torch.arange(start, stop, device=device))
            add(_hits_from_top(top, exclude_rows, label_rows, ks))
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
    backend: str = "exact",
    faiss_index: str = "Flat",
    precision: str = "auto",
) -> dict[int, float]:
    """Fraction of queries with an item of the target's label among the k most similar.

    query_features (Q, D) and gallery_features (N, D): tensors or arrays, ranked by cosine
    similarity (ties: see the module docstring). query_target_labels (Q,) and gallery_labels
    (N,): integer labels; every gallery item with the query's label counts as a hit.
    exclude_indices (Q,): a gallery index to drop for each query (its own source image), or -1.

    ``backend='exact'`` (default) scores ``chunk_size`` queries at a time with ``topk`` (default:
    chunks of at most 256 MB of similarities), so memory stays bounded, on the gallery's device.
    ``backend='faiss'`` searches a FAISS inner-product index instead (CPU, optional package
    faiss-cpu): ``faiss_index`` is an index-factory string, optionally followed by ``|`` and
    parameters, e.g. ``"Flat"`` (exact) or ``"IVF1024,Flat|nprobe=16"`` (approximate). FAISS
    breaks ties at the k-th place its own way.

    ``precision`` (exact backend): ``'fp32'`` ranks with fp32 similarities. ``'bf16'`` first
    scores in bfloat16 (several times faster where the hardware multiplies bf16 natively) and
    decides every query whose answer the rounding provably cannot change, ranking the others
    again in fp32: the result equals the fp32 one (see ``_screen_chunk``; for k up to
    ``SCREEN_K_MAX`` = 255, fp32 above). ``'auto'`` (default) takes bf16 on GPUs with bf16 and on
    CPUs with AVX512-BF16 or AMX, else fp32.
    Returns {k: recall in [0, 1]}.
    """
    return recall_at_k_label_sets(
        query_features,
        gallery_features,
        {"label": (query_target_labels, gallery_labels)},
        ks,
        exclude_indices,
        chunk_size,
        backend,
        faiss_index,
        precision,
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


def test_on_training_queries(
    model, dataset, queries: list[dict], batch_size: int, device: torch.device, num_workers: int = 0
) -> dict:
    """TIRG's approximation of training accuracy: a fixed sample of training queries ranked
    against the gallery of their own target images (one entry per query, as TIRG builds it, so
    an image that is the target of several queries is listed several times: exact ties)."""
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
