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
    with pytest.raises(ValueError, match="exclude_indices"):
        test_retrieval.recall_at_k(q, g, [0, 1], [0, 1, 2, 3], (1,), exclude_indices=[0, 9])
    with pytest.raises(ValueError, match=r"\(Q, D\)"):
        test_retrieval.recall_at_k(np.ones((2, 5)), g, [0, 1], [0, 1, 2, 3], (1,))


# --------------------------------------------------------------------------- evaluation


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
    # the training-set protocol: repeated targets are encoded once
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


def test_training_gallery_lists_each_target_once():
    torch.manual_seed(0)
    dataset = TinyStatesDataset(with_views=False)
    model = tiny_model("tirg", dataset)
    cpu = torch.device("cpu")
    # 15 queries on 3 targets of 3 different captions, 5 queries each
    queries = [
        dict(q, target_img_id=t, target_caption=dataset.captions[t])
        for q, t in zip(dataset.get_test_queries(), [2, 0, 1] * 5)
    ]
    train = test_retrieval.test_on_training_queries(model, dataset, queries, 4, cpu)
    # ranked against those 3 images: R@5 covers the gallery. (Listed once per query, each
    # target's 5 exact copies filled the top 5, and R@5 was R@1.)
    assert train["recall"][5] == 1.0
    alone = test_retrieval.evaluate(model, dataset, queries, [0, 1, 2], False, (1, 2, 5), 4, cpu)
    assert train["recall"] == alone["recall"]
    assert train["recall"][1] < 1.0  # the untrained model is not perfect: R@1 and R@5 differ
    assert test_retrieval.training_gallery_ids(queries) == [0, 1, 2]


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


@pytest.mark.cuda
def test_recall_on_cuda_equals_cpu():
    rng = np.random.default_rng(3)
    q, g = rng.standard_normal((500, 32)), rng.standard_normal((400, 32))
    g[200:] = g[:200]  # exact ties, ordered by index on both devices
    q_labels, g_labels = rng.integers(0, 100, 500), np.arange(400) % 150
    exclude = rng.integers(-1, 400, 500)
    cpu = test_retrieval.recall_at_k(q, g, q_labels, g_labels, (1, 5, 50), exclude, chunk_size=64)
    cuda = test_retrieval.recall_at_k(
        torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda(), q_labels, g_labels, (1, 5, 50),
        exclude, chunk_size=64,
    )  # fmt: skip
    assert cuda == cpu == brute_force_recall(q, g, q_labels, g_labels, (1, 5, 50), exclude)
