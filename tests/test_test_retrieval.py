import numpy as np
import pytest
import torch

import test_retrieval


def brute_force_recall(q, g, q_labels, g_labels, ks, exclude=None):
    """Full-matrix reference: argsort every row, TIRG style."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = {}
    sims = q @ g.T
    order = []
    for i in range(len(q)):
        s = sims[i].copy()
        ranked = [j for j in np.argsort(-s, kind="stable") if exclude is None or j != exclude[i]]
        order.append(ranked)
    for k in ks:
        out[k] = float(
            np.mean([any(g_labels[j] == q_labels[i] for j in order[i][:k]) for i in range(len(q))])
        )
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_recall_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(17, 8)), rng.normal(size=(23, 8))
    g_labels = rng.integers(0, 6, size=23)  # labels shared by many gallery items
    q_labels = rng.integers(0, 7, size=17)  # label 6 never occurs: never a hit
    exclude = rng.integers(-1, 23, size=17)
    ks = (1, 5, 10)
    ours = test_retrieval.recall_at_k(
        q, g, q_labels, g_labels, ks, exclude, chunk_size=chunk_size or 17
    )
    assert ours == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks, exclude))
    no_exclude = test_retrieval.recall_at_k(
        torch.tensor(q), torch.tensor(g), q_labels, g_labels, ks, chunk_size=chunk_size
    )
    assert no_exclude == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks))


def test_excluded_item_never_counts_even_when_k_covers_the_gallery():
    g = np.eye(3)
    q = np.array([[1.0, 0.0, 0.0]])
    # the only item with the target's label is the excluded source
    r = test_retrieval.recall_at_k(q, g, [7], [7, 1, 2], ks=(1, 3, 10), exclude_indices=[0])
    assert r == {1: 0.0, 3: 0.0, 10: 0.0}
    r = test_retrieval.recall_at_k(q, g, [7], [7, 1, 2], ks=(1,), exclude_indices=[-1])
    assert r == {1: 1.0}


def test_recall_checks_shapes():
    with pytest.raises(ValueError):
        test_retrieval.recall_at_k(np.ones((2, 3)), np.ones((4, 3)), [0], [0, 1, 2, 3], (1,))


# --------------------------------------------------------------------------- ties


def dyadic_features(rng, n, dim=8, nonzero=4):
    """Rows with `nonzero` entries of +-1: normalized entries are +-0.5, so every cosine
    similarity is a multiple of 0.25, computed exactly in float32 and float64 alike. Many exact
    ties, between items of the same label and of different labels."""
    x = np.zeros((n, dim))
    for i in range(n):
        cols = rng.choice(dim, size=nonzero, replace=False)
        x[i, cols] = rng.choice([-1.0, 1.0], size=nonzero)
    return x


def stable_reference_order(q, g, exclude=None):
    """Gallery indices per query by descending similarity, ties by ascending index (a stable
    argsort), the excluded item removed."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    return [
        [j for j in np.argsort(-sims[i], kind="stable") if exclude is None or j != exclude[i]]
        for i in range(len(q))
    ]


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_recall_with_many_exact_ties_matches_the_stable_reference(chunk_size):
    rng = np.random.default_rng(1)
    n_queries, n_gallery = 40, 60
    q, g = dyadic_features(rng, n_queries), dyadic_features(rng, n_gallery)
    g[30:40] = g[20:30]  # duplicate gallery items (as CSS's .dup file has)
    g_labels = rng.integers(0, 5, size=n_gallery)  # every label shared by ~12 items
    q_labels = rng.integers(0, 6, size=n_queries)
    exclude = rng.integers(-1, n_gallery, size=n_queries)
    ks = (1, 2, 5, 10, n_gallery - 1, n_gallery, n_gallery + 5)
    sims = (q / 2) @ (g / 2).T
    # the fixture really has ties at the k-th place: some k-th value recurs beyond the top k
    kth = np.sort(sims, axis=1)[:, ::-1][:, 4]
    assert np.any((sims == kth[:, None]).sum(1) > 1)
    for excl in (exclude, None):
        ours = test_retrieval.recall_at_k(
            q, g, q_labels, g_labels, ks, excl, chunk_size=chunk_size or n_queries
        )
        assert ours == brute_force_recall(q, g, q_labels, g_labels, ks, excl)
        top = test_retrieval.top_k_gallery(q, g, 10, excl, chunk_size=chunk_size)
        reference = stable_reference_order(q, g, excl)
        assert top.tolist() == [r[:10] for r in reference]


def test_tie_at_the_kth_place_goes_to_the_lowest_gallery_index():
    # query along e0; items 1..6 all have similarity 0.6 and only item 5 has the target's label;
    # item 0 is the best match. Under the rule, item 5 is 6th: a hit at 6, not at 5.
    g = np.array([[1.0, 0.0]] + [[0.6, 0.8]] * 6 + [[0.0, 1.0]] * 3)
    labels = np.array([1, 2, 3, 4, 6, 9, 7, 8, 8, 8])
    q = np.array([[1.0, 0.0]])
    for chunk_size in (1, None):
        r = test_retrieval.recall_at_k(q, g, [9], labels, ks=(1, 5, 6, 7), chunk_size=chunk_size)
        assert r == {1: 0.0, 5: 0.0, 6: 1.0, 7: 1.0}
    # excluding item 2 moves item 5 up by one place
    r = test_retrieval.recall_at_k(q, g, [9], labels, ks=(4, 5), exclude_indices=[2])
    assert r == {4: 0.0, 5: 1.0}
    assert test_retrieval.top_k_gallery(q, g, 5).tolist() == [[0, 1, 2, 3, 4]]


def test_recall_under_several_label_sets_ranks_once_and_matches_single_calls():
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(30, 16)), rng.normal(size=(50, 16))
    fine = rng.integers(0, 20, size=50), rng.integers(0, 20, size=30)
    coarse = fine[0] % 4, fine[1] % 4
    exclude = rng.integers(-1, 50, size=30)
    both = test_retrieval.recall_at_k_label_sets(
        q, g, {"fine": (fine[1], fine[0]), "coarse": (coarse[1], coarse[0])}, (1, 5), exclude, 7
    )
    assert both["fine"] == test_retrieval.recall_at_k(q, g, fine[1], fine[0], (1, 5), exclude)
    assert both["coarse"] == test_retrieval.recall_at_k(q, g, coarse[1], coarse[0], (1, 5), exclude)
    assert all(both["coarse"][k] >= both["fine"][k] for k in (1, 5))


def test_bad_inputs_are_named():
    q, g = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        test_retrieval.recall_at_k(np.full((2, 3), np.nan), g, [0, 1], [0, 1, 2, 3], (1,))
    for bad in (np.nan, np.inf, -np.inf):  # one bad value among finite ones, either side
        one_bad = np.ones((4, 3))
        one_bad[2, 1] = bad
        with pytest.raises(ValueError, match="gallery features hold NaN or inf"):
            test_retrieval.recall_at_k(q, one_bad, [0, 1], [0, 1, 2, 3], (1,))
        with pytest.raises(ValueError, match="query features hold NaN or inf"):
            test_retrieval.recall_at_k(one_bad[1:3], g, [0, 1], [0, 1, 2, 3], (1,))
    with pytest.raises(ValueError, match="backend"):
        test_retrieval.recall_at_k(q, g, [0, 1], [0, 1, 2, 3], (1,), backend="annoy")
    with pytest.raises(ValueError, match="exclude_indices"):
        test_retrieval.recall_at_k(q, g, [0, 1], [0, 1, 2, 3], (1,), exclude_indices=[0, 9])
    with pytest.raises(ValueError, match=r"\(Q, D\)"):
        test_retrieval.recall_at_k(np.ones((2, 5)), g, [0, 1], [0, 1, 2, 3], (1,))


# --------------------------------------------------------------------------- FAISS backend


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat|nprobe=4"])
def test_faiss_backend_matches_the_exact_path(index):
    pytest.importorskip("faiss", reason="optional dependency faiss-cpu is not installed")
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(37, 16)), rng.normal(size=(200, 16))  # continuous: no ties
    g_labels = rng.integers(0, 30, size=200)
    q_labels = rng.integers(0, 30, size=37)
    exclude = rng.integers(-1, 200, size=37)
    exclude[:5] = -1
    ks = (1, 5, 10, 50)
    for excl in (exclude, None):
        exact = test_retrieval.recall_at_k(q, g, q_labels, g_labels, ks, excl)
        faiss = test_retrieval.recall_at_k(
            q, g, q_labels, g_labels, ks, excl, chunk_size=10, backend="faiss", faiss_index=index
        )
        assert faiss == pytest.approx(exact)
        assert exact == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks, excl))
        assert torch.equal(
            test_retrieval.top_k_gallery(q, g, 10, excl, backend="faiss", faiss_index=index),
            test_retrieval.top_k_gallery(q, g, 10, excl),
        )


# --------------------------------------------------------------------------- evaluate()


class TinyStatesDataset:
    """A tiny dataset with TIRG's evaluation interface and MIT-States-like "adj noun" labels.

    Images are seeded noise (so identical ids give identical images); ``view`` relabels every
    image with one word of its caption, to check ``extra_label_views`` against a dataset whose
    labels are already coarse.
    """

    split = "test"
    recall_ks = (1, 2, 5)
    ADJS, NOUNS = ("old", "new", "wet"), ("cat", "car", "cup", "hat")

    def __init__(self, n_images=24, view=None, with_views=True):
        rng = np.random.default_rng(5)
        self.captions = [f"{self.ADJS[i % 3]} {self.NOUNS[(i // 3) % 4]}" for i in range(n_images)]
        self.view = view
        self.with_views = with_views
        self.pixels = rng.integers(0, 256, size=(n_images, 3, 32, 32), dtype=np.uint8)
        self.imgs = [{"captions": [c]} for c in self.captions]
        sources = rng.integers(0, n_images, size=15)
        targets = rng.integers(0, n_images, size=15)
        self.test_queries = [
            {
                "source_img_id": int(s),
                "target_img_id": int(t),
                "target_caption": self.captions[t],
                "mod": {"str": f"make it {self.captions[t].split()[0]}"},
            }
            for s, t in zip(sources, targets)
        ]

    def _relabel(self, label):
        words = label.split()
        return {"adj": words[0], "noun": words[1], None: label}[self.view]

    def get_test_queries(self):
        return self.test_queries

    def get_all_texts(self):
        return [q["mod"]["str"] for q in self.test_queries]

    def get_img(self, idx):
        return torch.from_numpy(self.pixels[idx])

    def gallery_labels(self):
        return [self._relabel(c) for c in self.captions]

    def query_label(self, query):
        return self._relabel(query["target_caption"])

    def extra_label_views(self):
        if not self.with_views:
            return {}
        return {"adj": lambda label: label.split()[0], "noun": lambda label: label.split()[1]}


def tiny_model(name, dataset):
    import img_text_composition_models
    import text_model

    text = text_model.TextLSTMModel(dataset.get_all_texts(), word_embed_dim=16, lstm_hidden_dim=16)
    return img_text_composition_models.MODELS[name](text, embed_dim=16, pretrained=False).eval()


def count_encoded_images(model):
    """Record how many images each extract_img_feature call receives (instrumentation only)."""
    counts = []
    original = model.extract_img_feature

    def counting(imgs):
        counts.append(imgs.shape[0])
        return original(imgs)

    model.extract_img_feature = counting
    return counts


def test_evaluate_encodes_each_image_once_and_reports_label_views():
    torch.manual_seed(0)
    dataset = TinyStatesDataset()
    model = tiny_model("tirg", dataset)
    counts = count_encoded_images(model)
    cpu = torch.device("cpu")
    res = test_retrieval.test(model, dataset, batch_size=7, device=cpu)
    sources = {q["source_img_id"] for q in dataset.get_test_queries()}
    assert sum(counts) == len(set(range(len(dataset.imgs))) | sources) == len(dataset.imgs)
    # the training-set protocol: the gallery lists a target once per query (repeats included)
    counts.clear()
    queries = dataset.get_test_queries()
    train = test_retrieval.test_on_training_queries(model, dataset, queries, 4, cpu)
    targets = [q["target_img_id"] for q in queries]
    assert len(set(targets)) < len(targets)  # the fixture has repeated targets
    assert sum(counts) == len(set(targets) | sources)

    assert set(res["extra_recall"]) == {"adj", "noun"}
    for view in ("adj", "noun"):
        coarse = test_retrieval.test(model, TinyStatesDataset(view=view, with_views=False), 7, cpu)
        assert res["extra_recall"][view] == coarse["recall"]
        assert (
            train["extra_recall"][view]
            == test_retrieval.test_on_training_queries(
                model, TinyStatesDataset(view=view, with_views=False), queries, 4, cpu
            )["recall"]
        )
        assert all(res["extra_recall"][view][k] >= res["recall"][k] for k in (1, 2, 5))
    plain = test_retrieval.test(model, TinyStatesDataset(with_views=False), 7, cpu)
    assert plain["extra_recall"] == {} and plain["recall"] == res["recall"]

    # the ranked lists of the qualitative figure: source excluded, correctness by label
    positions = test_retrieval.qualitative_query_indices(len(queries))
    assert [r["query_index"] for r in res["ranked"]] == positions
    labels = dataset.gallery_labels()
    for r in res["ranked"]:
        query = queries[r["query_index"]]
        assert len(r["gallery_ids"]) == 10 and query["source_img_id"] not in r["gallery_ids"]
        assert r["correct"] == [labels[j] == query["target_caption"] for j in r["gallery_ids"]]


def test_model_that_cannot_compose_features_encodes_the_gallery_once():
    torch.manual_seed(0)
    dataset = TinyStatesDataset(n_images=12)
    model = tiny_model("tirg_lastconv", dataset)
    counts = count_encoded_images(model)
    res = test_retrieval.test(model, dataset, batch_size=5, device=torch.device("cpu"))
    assert sum(counts) == len(dataset.imgs)  # query images go through compose_img_text instead
    assert set(res["recall"]) == {1, 2, 5}


class TinyGroupedDataset(TinyStatesDataset):
    """Two evaluation groups (as FashionIQ's categories): even queries against the first half
    of the images, odd queries against the second half."""

    def evaluation_groups(self):
        half = len(self.imgs) // 2
        return [
            {"name": "even", "queries": self.test_queries[0::2], "gallery_ids": range(half)},
            {
                "name": "odd",
                "queries": self.test_queries[1::2],
                "gallery_ids": range(half, len(self.imgs)),
            },
        ]


def test_evaluation_groups_are_ranked_separately_and_averaged():
    torch.manual_seed(0)
    dataset = TinyGroupedDataset()
    model = tiny_model("tirg", dataset)
    cpu = torch.device("cpu")
    res = test_retrieval.test(model, dataset, batch_size=8, device=cpu, ranked_queries=[3, 4])
    groups = {
        g["name"]: test_retrieval.evaluate(
            model, dataset, g["queries"], g["gallery_ids"], True, dataset.recall_ks, 8, cpu
        )
        for g in dataset.evaluation_groups()
    }
    for k in dataset.recall_ks:
        mean = (groups["even"]["recall"][k] + groups["odd"]["recall"][k]) / 2
        assert res["recall"][k] == pytest.approx(mean)
    assert res["extra_recall"]["even"] == groups["even"]["recall"]
    assert res["extra_recall"]["odd_noun"] == groups["odd"]["extra_recall"]["noun"]
    assert [r["query_index"] for r in res["ranked"]] == [3, 4]
    queries = dataset.get_test_queries()
    half = len(dataset.imgs) // 2
    for r in res["ranked"]:  # query 3 is odd: its results come from the second half only
        in_half = [j >= half for j in r["gallery_ids"]]
        assert all(in_half) if r["query_index"] % 2 else not any(in_half)
        assert queries[r["query_index"]]["source_img_id"] not in r["gallery_ids"]


# --------------------------------------------------------------------------- bf16 screening


def correlated_data(rng, n_queries, n_gallery, dim, noise, n_labels):
    """Queries near a random gallery item (noise sets how clear-cut the ranking is)."""
    g = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    g_labels = rng.integers(0, n_labels, size=n_gallery)
    target = rng.integers(0, n_gallery, size=n_queries)
    q = g[target] + noise * rng.standard_normal((n_queries, dim)).astype(np.float32)
    return q, g, g_labels[target], g_labels


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_bf16_screen_gives_the_fp32_recall(chunk_size):
    rng = np.random.default_rng(7)
    for noise in (0.5, 1.5, 3.0):  # from clear-cut rankings to close races
        q, g, q_labels, g_labels = correlated_data(rng, 60, 400, 32, noise, n_labels=150)
        g[200:260] = g[100:160]  # duplicate gallery items: exact ties
        exclude = rng.integers(-1, 400, size=60)
        for ks in ((1, 5, 10), (1, 10, 50)):
            for excl in (exclude, None):
                fp32 = test_retrieval.recall_at_k(
                    q, g, q_labels, g_labels, ks, excl, chunk_size, precision="fp32"
                )
                bf16 = test_retrieval.recall_at_k(
                    q, g, q_labels, g_labels, ks, excl, chunk_size, precision="bf16"
                )
                assert bf16 == fp32
        assert fp32 == pytest.approx(brute_force_recall(q, g, q_labels, g_labels, ks))


def always_sample(monkeypatch, stride=3):
    """Make the screen's sample pass run on every chunk of a small gallery."""
    monkeypatch.setattr(test_retrieval, "SAMPLE_STRIDE", stride)
    monkeypatch.setattr(test_retrieval, "SAMPLE_MIN_PER_K", 0)
    monkeypatch.setattr(test_retrieval, "SAMPLE_MIN_SETTLED", 0.0)
    monkeypatch.setattr(test_retrieval, "SAMPLE_MAX_HIT_SHARE", float("inf"))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("int8_counts", [True, False], ids=["int8-counts", "bf16-counts"])
@pytest.mark.parametrize("sample", [False, True], ids=["whole", "sample-first"])
def test_bf16_screen_equals_fp32_on_random_problems(seed, int8_counts, sample, monkeypatch):
    # bf16-counts: the GPU's way of counting, run here on the CPU. sample-first: the sample
    # pass settles what it can before the whole gallery is scored.
    monkeypatch.setattr(test_retrieval, "_int8_counts", lambda device: int8_counts)
    if sample:
        always_sample(monkeypatch)
    # Shared directions, duplicate items, labels absent from the gallery, a coarse second label
    # set with many hits per query, any chunk size, k up to the screen's limit.
    rng = np.random.default_rng(100 + seed)
    n_gallery, n_queries, dim = int(rng.integers(64, 500)), int(rng.integers(1, 200)), 24
    g = rng.standard_normal((n_gallery, dim)).astype(np.float32) + float(rng.choice([0, 20]))
    if seed % 3 == 0:  # duplicate items: exact ties
        g[n_gallery // 2 :] = g[: n_gallery - n_gallery // 2]
    g_labels = rng.integers(0, int(rng.integers(1, n_gallery)), size=n_gallery)
    target = rng.integers(0, n_gallery, size=n_queries)
    noise = float(rng.choice([0.05, 0.5, 2.0]))
    q = g[target] + noise * rng.standard_normal((n_queries, dim)).astype(np.float32)
    q_labels = g_labels[target].copy()
    q_labels[::4] = -1  # no such gallery label
    label_sets = {"label": (q_labels, g_labels), "coarse": (q_labels // 4, g_labels // 4)}
    exclude = rng.integers(-1, n_gallery, size=n_queries) if seed % 2 else None
    ks = sorted({1, int(rng.integers(2, 20))} | ({8} if sample else {test_retrieval.SCREEN_K_MAX}))
    chunk = int(rng.integers(1, n_queries + 1))
    fp32 = test_retrieval.recall_at_k_label_sets(q, g, label_sets, ks, exclude, precision="fp32")
    bf16 = test_retrieval.recall_at_k_label_sets(
        q, g, label_sets, ks, exclude, chunk, precision="bf16"
    )
    assert bf16 == fp32


def test_label_index_lists_every_hit_once_without_the_excluded_item():
    rng = np.random.default_rng(3)
    g_labels = torch.from_numpy(rng.integers(0, 20, size=300))
    q_labels = torch.from_numpy(rng.integers(-2, 22, size=50))  # some labels have no items
    exclude = torch.from_numpy(rng.integers(-1, 300, size=50))
    rows, items = test_retrieval._LabelIndex(g_labels).hits(q_labels, exclude)
    got = sorted(zip(rows.tolist(), items.tolist()))
    expected = [
        (i, j)
        for i in range(50)
        for j in range(300)
        if g_labels[j] == q_labels[i] and j != exclude[i]
    ]
    assert got == expected
    assert torch.all(rows[1:] >= rows[:-1])  # grouped by row, as the screen assumes


def test_bf16_bit_patterns_round_in_the_asked_direction_and_compare_as_numbers():
    thresholds = torch.tensor([1e-30, 3e-3, 0.1, 0.3333, 1.0, 7.77, 1e30])
    down = test_retrieval._bf16_bits(thresholds, "down").view(torch.bfloat16).float()
    up = test_retrieval._bf16_bits(thresholds, "up").view(torch.bfloat16).float()
    assert torch.all(down <= thresholds) and torch.all(up >= thresholds)
    assert torch.all(down > 0)
    assert torch.all(up.to(torch.bfloat16).float() == up)  # exact bf16 numbers
    # each is the nearest bf16 number on its side: one step further crosses the threshold
    step_down = (test_retrieval._bf16_bits(thresholds, "down") + 1).view(torch.bfloat16).float()
    assert torch.all(step_down > thresholds)
    values = torch.cat(
        [torch.randn(1000) * 3, torch.tensor([float("-inf"), -0.0, 0.0, float("inf")])]
    ).to(torch.bfloat16)
    bits = test_retrieval._bf16_bits(thresholds, "down")
    for t, b in zip(thresholds.to(torch.bfloat16), bits):
        ge = values.view(torch.int16) >= b
        assert torch.equal(ge, values.float() >= b.view(torch.bfloat16).float()), t


def test_bf16_screen_with_near_twins_whose_order_bf16_cannot_resolve():
    # Every target has a twin with another label, closer than bf16's resolution: R@1 hinges on
    # fp32 differences of ~1e-4, which only the fp32 re-ranking sees.
    rng = np.random.default_rng(11)
    base = rng.standard_normal((150, 64)).astype(np.float32)
    twins = base + 2e-3 * rng.standard_normal(base.shape).astype(np.float32)
    g = np.concatenate([base, twins])
    g_labels = np.concatenate([np.arange(150), np.arange(150) + 1000])
    target = rng.integers(0, 150, size=200)
    q = base[target] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    ks = (1, 2, 5)
    fp32 = test_retrieval.recall_at_k(q, g, target, g_labels, ks, precision="fp32")
    assert 0.2 < fp32[1] < 0.8 and fp32[2] == 1.0  # the twins really race for the first place
    assert test_retrieval.recall_at_k(q, g, target, g_labels, ks, precision="bf16") == fp32


def test_bf16_screen_decides_clear_rows_and_defers_close_ones(monkeypatch):
    # The counts alone leave close races open; the second look at the candidates' fp32
    # similarities settles them, except exact ties, which only the tie rule orders. Whatever
    # the screen decides is the fp32 answer.
    def screen(q, g, q_labels, g_labels):
        queries = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
        gallery = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
        index = test_retrieval._LabelIndex(torch.from_numpy(g_labels))
        labels = {"label": (torch.from_numpy(q_labels), index)}
        screened = test_retrieval._BF16Gallery(gallery)
        hits, uncertain = test_retrieval._screen_chunk(queries, screened, None, labels, (1, 5, 10))
        exact = test_retrieval.recall_at_k_label_sets(
            queries[~uncertain], gallery_features=torch.from_numpy(g),
            label_sets={"label": (q_labels[~uncertain.numpy()], g_labels)}, ks=(1, 5, 10),
            precision="fp32",
        )["label"]  # fmt: skip
        decided = hits["label"][~uncertain].float().mean(dim=0).tolist()
        assert decided == pytest.approx([exact[k] for k in (1, 5, 10)])
        return int(uncertain.sum())

    rng = np.random.default_rng(8)
    data = correlated_data(rng, 400, 500, 64, 1.5, n_labels=200)
    limit = test_retrieval.CANDIDATE_LIMIT
    monkeypatch.setattr(test_retrieval, "CANDIDATE_LIMIT", -1)  # counts only
    assert 0 < screen(*data) < 400 // 2
    monkeypatch.setattr(test_retrieval, "CANDIDATE_LIMIT", limit)
    assert screen(*data) == 0
    q, g, q_labels, g_labels = data
    g[250:300] = g[200:250]  # exact twins with other labels
    g_labels[250:300] = g_labels[200:250] + 1000
    assert screen(q, g, q_labels, g_labels) > 0


@pytest.mark.parametrize("kind", ["normal", "sparse", "spiky", "shared_direction"])
def test_bf16_error_bound_holds_for_every_item(kind):
    rng = np.random.default_rng(9)
    q = rng.standard_normal((64, 128)).astype(np.float32)
    g = rng.standard_normal((700, 128)).astype(np.float32)
    if kind == "sparse":  # rounding errors of few large entries cannot average out
        q[:, 4:] = 0.0
        g[:, 4:] = 0.0
    if kind == "spiky":
        q[:, 0] *= 50.0
        g[:, 0] *= 50.0
    if kind == "shared_direction":  # an untrained model's features: all nearly parallel
        q, g = 10.0 + q, 10.0 + g
    queries = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    gallery = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
    rounded_gallery = test_retrieval._BF16Gallery(gallery)
    offsets = rounded_gallery.probe_offsets(queries)
    rounded = rounded_gallery.round_queries(queries, offsets)
    approx = test_retrieval._bf16_similarities(rounded, rounded_gallery.features).double()
    fp32 = (queries @ gallery.t()).double()  # the ranking the screen must agree with
    # The screen scores are the similarities less a constant per row: the query's product
    # with the gallery mean and its offset.
    row_constant = queries.double() @ rounded_gallery.mean.double() - rounded[:, -1].double()
    error = (approx - (fp32 - row_constant[:, None])).abs().max(dim=1).values
    largest = approx.abs().max(dim=1).values
    eps = test_retrieval._screen_error_bound(queries, rounded, rounded_gallery, largest).double()
    assert torch.all(error <= eps)
    assert error.max() > eps.max() / 50  # the bound is not vacuous


def test_bf16_screen_decides_rows_of_nearly_parallel_features():
    # All features close to one direction, every similarity above 0.98 (an untrained model's
    # features look like this), gallery items in pairs that race for the first place. bf16
    # resolves 2^-8 near 1: without the centering and the row offsets, every row was
    # undecided here. With them the screen decides most rows, and the result is the fp32 one.
    rng = np.random.default_rng(13)
    centers = 30.0 + rng.standard_normal((200, 64)).astype(np.float32)
    g = np.repeat(centers, 2, axis=0) + rng.standard_normal((400, 64)).astype(np.float32)
    g_labels = np.arange(400)
    target = rng.integers(0, 400, size=300)
    q = g[target] + 2.5 * rng.standard_normal((300, 64)).astype(np.float32)
    queries = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    gallery = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
    assert (queries @ gallery.t()).min() > 0.98
    index = test_retrieval._LabelIndex(torch.from_numpy(g_labels))
    labels = {"label": (torch.from_numpy(g_labels[target]), index)}
    screened = test_retrieval._BF16Gallery(gallery)
    _, uncertain = test_retrieval._screen_chunk(queries, screened, None, labels, (1, 5))
    assert uncertain.float().mean() < 0.5
    ks = (1, 5)
    fp32 = test_retrieval.recall_at_k(q, g, target, g_labels, ks, precision="fp32")
    assert 0.5 < fp32[1] < 1.0  # the pairs really race
    assert test_retrieval.recall_at_k(q, g, target, g_labels, ks, precision="bf16") == fp32


def test_precision_choice():
    assert test_retrieval._use_bf16_screen("fp32", torch.device("cpu"), "exact", 10**6, 10) is False
    assert test_retrieval._use_bf16_screen("bf16", torch.device("cpu"), "exact", 10**6, 10) is True
    # too small a gallery, or another backend: fp32
    assert test_retrieval._use_bf16_screen("bf16", torch.device("cpu"), "exact", 50, 10) is False
    # the screen's counts are exact below 256
    assert (
        test_retrieval._use_bf16_screen("bf16", torch.device("cpu"), "exact", 10**6, 256) is False
    )
    assert test_retrieval._use_bf16_screen("bf16", torch.device("cpu"), "faiss", 10**6, 10) is False
    with pytest.raises(ValueError, match="precision"):
        test_retrieval.recall_at_k(
            np.ones((1, 2)), np.ones((3, 2)), [0], [0, 1, 2], (1,), precision="fp16"
        )


def test_bf16_screen_is_not_confused_by_repeated_targets():
    # TIRG's training-set gallery lists a target once per query: repeated hits must not make a
    # clear-cut row uncertain (they tie with the best hit, but they are hits too).
    rng = np.random.default_rng(12)
    base = rng.standard_normal((150, 64)).astype(np.float32)
    g = np.concatenate([base, base])
    g_labels = np.concatenate([np.arange(150), np.arange(150)])
    target = rng.integers(0, 150, size=100)
    q = base[target] + 0.3 * rng.standard_normal((100, 64)).astype(np.float32)
    queries = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    gallery = test_retrieval._BF16Gallery(torch.nn.functional.normalize(torch.from_numpy(g), dim=1))
    index = test_retrieval._LabelIndex(torch.from_numpy(g_labels))
    labels = {"label": (torch.from_numpy(target), index)}
    hits, uncertain = test_retrieval._screen_chunk(queries, gallery, None, labels, (1, 5))
    assert not uncertain.any() and hits["label"].all()
    assert test_retrieval.recall_at_k(q, g, target, g_labels, (1, 5), precision="bf16") == {
        1: 1.0,
        5: 1.0,
    }


def screen_inputs(q, g, q_labels, g_labels):
    queries = torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    gallery = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
    index = test_retrieval._LabelIndex(torch.from_numpy(g_labels))
    return (
        queries,
        test_retrieval._BF16Gallery(gallery),
        {"label": (torch.from_numpy(q_labels), index)},
    )


def test_sample_pass_settles_only_rows_without_a_hit_in_the_top_k(monkeypatch):
    # Unrelated queries: hits rank far down, and the sample alone shows it for most rows.
    # Every row it settles has no hit among its k_max first items in the fp32 ranking.
    monkeypatch.setattr(test_retrieval, "SAMPLE_STRIDE", 8)
    rng = np.random.default_rng(21)
    g = rng.standard_normal((3000, 32)).astype(np.float32)
    g_labels = rng.integers(0, 1000, size=3000)
    q = rng.standard_normal((400, 32)).astype(np.float32)
    q[:100] = g[:100] + 0.3 * rng.standard_normal((100, 32)).astype(np.float32)  # near a hit
    q_labels = rng.integers(0, 1000, size=400)
    q_labels[:100] = g_labels[:100]
    exclude = rng.integers(-1, 3000, size=400)
    k_max = 10
    queries, gallery, labels = screen_inputs(q, g, q_labels, g_labels)
    exclude_t = torch.from_numpy(exclude)
    hit_lists = {"label": labels["label"][1].hits(labels["label"][0], exclude_t)}
    rounded, errors, dots = test_retrieval._offset_queries(
        queries, gallery, *hit_lists["label"], all_hits=True
    )
    buffers = test_retrieval._ScreenBuffers(400, gallery.sample)
    missed = test_retrieval._sample_misses(
        rounded, errors, gallery, exclude_t, hit_lists, dots, k_max, buffers
    )
    sims = (queries @ gallery.gallery.t()).numpy()
    in_top = []
    for i in range(400):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != exclude[i]]
        in_top.append(any(g_labels[j] == q_labels[i] for j in order[:k_max]))
    in_top = np.array(in_top)
    assert not np.any(missed.numpy() & in_top)
    assert in_top[:100].all() and not missed[:100].any()
    assert missed[100:].float().mean() > 0.8  # the pass is worth its cost here


def test_sample_pass_skips_the_excluded_item(monkeypatch):
    # Each query is a copy of a sampled gallery item that is excluded for it; its hit comes
    # right after. Counted, the excluded copy would push the hit out of the top 1.
    always_sample(monkeypatch, stride=4)
    rng = np.random.default_rng(22)
    g = rng.standard_normal((400, 32)).astype(np.float32)
    g_labels = np.arange(400)
    sources = np.arange(0, 200, 4)  # in the sample
    g[sources + 1] = g[sources] + 0.3 * rng.standard_normal((50, 32)).astype(np.float32)
    q, q_labels = g[sources].copy(), g_labels[sources + 1]
    for exclude in (sources, None):
        recall = test_retrieval.recall_at_k(
            q, g, q_labels, g_labels, (1,), exclude, precision="bf16"
        )
        assert recall == brute_force_recall(q, g, q_labels, g_labels, (1,), exclude)
        assert recall[1] == (1.0 if exclude is not None else 0.0)


def test_sample_pass_does_not_count_near_ties(monkeypatch):
    # Each query's hit is first in fp32, closely followed by sampled near-twins with other
    # labels that bf16 cannot tell from it: only items surely above every hit may count.
    always_sample(monkeypatch, stride=4)
    rng = np.random.default_rng(24)
    g = rng.standard_normal((400, 64)).astype(np.float32)
    g_labels = np.arange(400)
    hits = np.arange(1, 200, 4)  # not sampled
    for offset in (-1, 3):  # their twins are
        g[hits + offset] = g[hits] + 1e-3 * rng.standard_normal((50, 64)).astype(np.float32)
    q, q_labels = g[hits].copy(), g_labels[hits]
    ks = (1, 2)
    fp32 = test_retrieval.recall_at_k(q, g, q_labels, g_labels, ks, precision="fp32")
    assert fp32 == {1: 1.0, 2: 1.0}
    assert test_retrieval.recall_at_k(q, g, q_labels, g_labels, ks, precision="bf16") == fp32


def test_sample_pass_stops_when_it_stops_paying(monkeypatch):
    monkeypatch.setattr(test_retrieval, "SAMPLE_STRIDE", 4)
    rng = np.random.default_rng(23)
    # hits far down (kept), hits near the top (few rows settled), hits far down but hundreds
    # of them per query (their pair-wise scores would cost more than the sample saves)
    for case, n_labels, kept in (
        ("unrelated", 700, True),
        ("near", 700, False),
        ("many", 5, False),
    ):
        g = rng.standard_normal((2000, 32)).astype(np.float32)
        g_labels = rng.integers(0, n_labels, size=2000)
        if case == "near":
            target = rng.integers(0, 2000, size=200)
            q = g[target] + 0.2 * rng.standard_normal((200, 32)).astype(np.float32)
            q_labels = g_labels[target]
        else:
            q = rng.standard_normal((200, 32)).astype(np.float32)
            q_labels = rng.integers(0, n_labels, size=200)
        if case == "many":  # whatever the rows it would settle
            monkeypatch.setattr(test_retrieval, "SAMPLE_MIN_SETTLED", 0.0)
        queries, gallery, labels = screen_inputs(q, g, q_labels, g_labels)
        buffers = test_retrieval._ScreenBuffers(200, gallery.features, gallery.sample)
        hits, uncertain = test_retrieval._screen_chunk(
            queries, gallery, None, labels, (1, 10), buffers
        )
        assert (buffers.sample is not None) == kept, case
        certain = ~uncertain.numpy()
        fp32 = test_retrieval.recall_at_k(
            q[certain], g, q_labels[certain], g_labels, (1, 10), precision="fp32"
        )
        decided = hits["label"][~uncertain].float().mean(dim=0).tolist()
        assert decided == pytest.approx([fp32[1], fp32[10]]), case
