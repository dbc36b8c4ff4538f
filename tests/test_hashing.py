"""Learning to hash: loaders in the real layouts, the triplet loss, Hamming mAP, the sampler, and
the task module's contract with main.py."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os

import numpy as np
import PIL.Image
import pytest
import scipy.io
import torch

import datasets
import hashing
import test_retrieval

PALETTE = [(230, 30, 30), (30, 200, 30), (30, 60, 220), (240, 220, 40)]


def write_png(path, color, size=32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.new("RGB", (size, size), color).save(path)


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------- fixtures


def make_cub(root, n_classes=3, per_class=4):
    """CUB-200-2011's layout: ids 1.., every other image of a class in train."""
    classes, images, split, labels = [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/Bird_{c}_{k:04d}.jpg"
            write_png(os.path.join(root, "images", rel), PALETTE[c % 4])
            images.append(f"{image_id} {rel}")
            split.append(f"{image_id} {1 if k % 2 == 0 else 0}")
            labels.append(f"{image_id} {c}")
    write_lines(os.path.join(root, "classes.txt"), classes)
    write_lines(os.path.join(root, "images.txt"), images)
    write_lines(os.path.join(root, "train_test_split.txt"), split)
    write_lines(os.path.join(root, "image_class_labels.txt"), labels)
    return root


def make_dogs(root, lists_dir="lists", train=None, test=None):
    """Stanford Dogs' layout: Images/<wnid>-<breed>/, .mat lists with cell arrays of paths."""
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    files = {}
    for b, breed in enumerate(breeds):
        for k in range(4):
            rel = f"{breed}/{breed.split('-')[0]}_{k}.jpg"
            write_png(os.path.join(root, "Images", rel), PALETTE[b])
            files.setdefault("train" if k < 2 else "test", []).append((rel, b + 1))
    for split, entries in (("train", train), ("test", test)):
        entries = files[split] if entries is None else entries
        cells = np.empty((len(entries), 1), dtype=object)
        for i, (rel, _) in enumerate(entries):
            cells[i, 0] = np.array([rel])
        labels = np.array([[label] for _, label in entries], dtype=np.float64)
        os.makedirs(os.path.join(root, lists_dir), exist_ok=True)
        scipy.io.savemat(
            os.path.join(root, lists_dir, f"{split}_list.mat"),
            {"file_list": cells, "labels": labels},
        )
    return root


def make_image_folder(root, classes=("cat", "dog", "fox"), train=3, test=2, size=32):
    for c, name in enumerate(classes):
        for split, n in (("train", train), ("test", test)):
            for k in range(n):
                # a per-image shade, so codes differ between images of a class
                color = tuple(min(255, v + 7 * k) for v in PALETTE[c % 4])
                write_png(os.path.join(root, split, name, f"{k}.png"), color, size)
    return root


def hashing_args(**overrides):
    parser = argparse.ArgumentParser()
    hashing.add_arguments(parser)
    args = parser.parse_args([])
    base = dict(
        dataset="image_folder",
        dataset_path=None,
        data_dir=None,
        seed=0,
        batch_size=8,
        classes_per_batch=2,
        image_size=32,
        on_bad_image="skip",
        pretrained=False,
        learning_rate=1e-4,
        weight_decay=0.0,
        ga_adv_eps=0.0,
        fgsm_eps=0.0,
        loader_num_workers=0,
        eval_batch_size=4,
        train_eval_queries=5,
    )
    base.update(overrides)
    for key, value in base.items():
        setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------- CUB-200-2011


def test_cub_reads_the_split_and_0_based_classes(tmp_path):
    root = make_cub(str(tmp_path / "CUB_200_2011"))
    train = datasets.CUB200(root, "train")
    test = datasets.CUB200(root, "test")
    assert len(train.imgs) == len(test.imgs) == 6
    assert train.labels == [0, 0, 1, 1, 2, 2]
    assert train.class_names[1] == "002.Bird_2"
    assert train.image_path(1).endswith(os.path.join("images", "001.Bird_1", "Bird_1_0002.jpg"))
    assert test.image_path(0).endswith("Bird_1_0001.jpg")
    assert len(test.get_test_queries()) == 6 and not train.synthetic


def test_cub_malformed_line_names_file_and_line(tmp_path):
    root = make_cub(str(tmp_path / "cub"))
    path = os.path.join(root, "image_class_labels.txt")
    lines = open(path).read().splitlines()
    lines[2] = "three 1"
    write_lines(path, lines)
    with pytest.raises(datasets.DatasetFormatError, match=r"image_class_labels\.txt:3: expected"):
        datasets.CUB200(root, "train")


def test_cub_path_escaping_the_root_is_refused(tmp_path):
    root = make_cub(str(tmp_path / "cub"))
    path = os.path.join(root, "images.txt")
    lines = open(path).read().splitlines()
    lines[0] = "1 ../../etc/passwd"
    write_lines(path, lines)
    with pytest.raises(datasets.DatasetFormatError, match=r"images\.txt:1: refusing the image"):
        datasets.CUB200(root, "train")


def test_cub_label_out_of_range_names_file_and_line(tmp_path):
    root = make_cub(str(tmp_path / "cub"))
    path = os.path.join(root, "image_class_labels.txt")
    lines = open(path).read().splitlines()
    lines[4] = "5 7"
    write_lines(path, lines)
    with pytest.raises(datasets.DatasetFormatError, match=r"image_class_labels\.txt:5: class '7'"):
        datasets.CUB200(root, "test")


def test_cub_missing_file_names_path_and_layout(tmp_path):
    root = make_cub(str(tmp_path / "cub"))
    os.remove(os.path.join(root, "train_test_split.txt"))
    with pytest.raises(
        FileNotFoundError, match=r"(?s)train_test_split\.txt not found.*1: train, 0: test"
    ):
        datasets.CUB200(root, "train")


def test_missing_image_is_skipped_and_counted(tmp_path):
    root = make_cub(str(tmp_path / "cub"))
    train = datasets.CUB200(root, "train", transform=datasets.ResizeCenterCrop(32))
    os.remove(train.image_path(2))
    with pytest.warns(datasets.BadImageWarning, match="image file missing"):
        placeholder = train.get_img(2)
    assert placeholder.shape == (3, 32, 32) and train.bad_image_count() == 1
    # A training batch never shows the missing image: it is redrawn from the same class.
    train.use_class_balanced_batches(batch_size=6, classes_per_batch=3)
    ids = [train[i]["image_id"] for i in range(60)]
    assert 2 not in ids
    for i in range(60):
        item = train[i]
        assert item["label"] == train.labels[item["image_id"]]
    with pytest.raises(datasets.BadImageError, match="image file missing"):
        datasets.CUB200(root, "train", on_bad_image="fail").get_img(2)


# ------------------------------------------------------------------------------ Stanford Dogs


def test_dogs_reads_mat_lists(tmp_path):
    root = make_dogs(str(tmp_path / "dogs"))
    train = datasets.StanfordDogs(root, "train")
    test = datasets.StanfordDogs(root, "test")
    assert len(train.imgs) == len(test.imgs) == 6
    assert train.labels == [0, 0, 1, 1, 2, 2]
    assert train.class_names[2] == "n02085936-Maltese_dog"
    assert os.path.isfile(test.image_path(5))
    # lists.tar extracts to the root: accepted there too
    flat = make_dogs(str(tmp_path / "flat"), lists_dir=".")
    assert len(datasets.StanfordDogs(flat, "train").imgs) == 6


def test_dogs_label_out_of_range_names_the_entry(tmp_path):
    rel = "n02085620-Chihuahua/n02085620_0.jpg"
    root = make_dogs(str(tmp_path / "dogs"), train=[(rel, 1), (rel, 0)])
    with pytest.raises(datasets.DatasetFormatError, match=r"train_list\.mat: entry 2.*1\.\.3"):
        datasets.StanfordDogs(root, "train")
    root = make_dogs(str(tmp_path / "dogs4"), test=[(rel, 4)])
    with pytest.raises(datasets.DatasetFormatError, match=r"test_list\.mat: entry 1"):
        datasets.StanfordDogs(root, "test")


def test_dogs_path_escaping_and_missing_list(tmp_path):
    root = make_dogs(str(tmp_path / "dogs"), train=[("../../secret.jpg", 1)])
    with pytest.raises(datasets.DatasetFormatError, match=r"train_list\.mat: entry 1: refusing"):
        datasets.StanfordDogs(root, "train")
    os.remove(os.path.join(root, "lists", "test_list.mat"))
    with pytest.raises(FileNotFoundError, match=r"test_list\.mat not found"):
        datasets.StanfordDogs(root, "test")
    with open(os.path.join(root, "lists", "test_list.mat"), "w") as f:
        f.write("not a mat file")
    with pytest.raises(datasets.DatasetFormatError, match=r"test_list\.mat: cannot read"):
        datasets.StanfordDogs(root, "test")


# ------------------------------------------------------------------- image folder, synthetic


def test_image_folder_classes_agree_between_splits(tmp_path):
    root = make_image_folder(str(tmp_path / "folder"))
    os.makedirs(os.path.join(root, "test", "zebra"))
    write_png(os.path.join(root, "test", "zebra", "0.png"), (0, 0, 0))
    train = datasets.HASHING_DATASETS["image_folder"](root, "train")
    test = datasets.HASHING_DATASETS["image_folder"](root, "test")
    assert train.class_names == test.class_names == ["cat", "dog", "fox", "zebra"]
    assert train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.labels[-1] == 3 and not test.synthetic


def test_image_folder_refuses_a_link_out_of_the_root(tmp_path):
    root = make_image_folder(str(tmp_path / "folder"))
    write_png(str(tmp_path / "outside.png"), (1, 2, 3))
    os.symlink(str(tmp_path / "outside.png"), os.path.join(root, "train", "cat", "x.png"))
    with pytest.raises(datasets.DatasetFormatError, match="outside the dataset root"):
        datasets.ImageFolderClasses(root, "train")


def _tree_digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def test_synthetic_set_is_deterministic_and_marked(tmp_path):
    a = datasets.generate_hashing_synthetic(str(tmp_path / "a"), seed=3, train_per_class=2,
                                            test_per_class=1)  # fmt: skip
    datasets.generate_hashing_synthetic(str(tmp_path / "b"), seed=3, train_per_class=2,
                                        test_per_class=1)  # fmt: skip
    datasets.generate_hashing_synthetic(str(tmp_path / "c"), seed=4, train_per_class=2,
                                        test_per_class=1)  # fmt: skip
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    train = datasets.HashingSynthetic(str(tmp_path / "a"), "train")
    assert train.synthetic and a["synthetic"] and len(train.class_names) == 20
    assert len(train.imgs) == 40 and sorted(set(train.labels)) == list(range(20))
    # the main object's colour dominates the non-white pixels of its class
    shape, color = datasets.HASHING_SYNTHETIC_CLASSES[train.labels[5]]
    pixels = np.asarray(train.get_img(5)).reshape(-1, 3)
    count = (pixels == np.array(datasets.css_generator.COLORS[color])).all(1).sum()
    assert count >= 0.5 * (pixels != 255).any(1).sum()


def test_build_datasets_without_path_generates_the_stand_in(tmp_path, capsys):
    args = hashing_args(data_dir=str(tmp_path / "data"), batch_size=16, classes_per_batch=4)
    train, test = hashing.build_datasets(args)
    assert "SYNTHETIC" in capsys.readouterr().out
    assert train.synthetic and test.synthetic
    assert (len(train.imgs), len(test.imgs)) == (20 * 64, 20 * 20)
    assert train[0]["image"].shape == (3, 64, 64)
    assert os.path.isdir(tmp_path / "data" / "hashing_synthetic_seed0")


# --------------------------------------------------------------------------------- sampler


def test_class_balanced_batches_are_balanced_and_pure(tmp_path):
    root = make_image_folder(str(tmp_path / "f"), classes=tuple("abcdef"), train=5, test=1)
    train = datasets.ImageFolderClasses(root, "train")
    train.seed = 7
    train.use_class_balanced_batches(batch_size=7, classes_per_batch=3)
    for batch in range(20):
        items = [train[batch * 7 + j] for j in range(7)]
        counts = sorted(np.bincount([it["label"] for it in items]).tolist(), reverse=True)
        assert counts[:3] == [3, 2, 2] and sum(counts) == 7
        ids = [it["image_id"] for it in items]
        assert len(set(ids)) == 7  # without replacement within a class
    # a pure function of (seed, index): any order, a fresh object, the same items
    order = [train[i]["image_id"] for i in range(70)]
    again = datasets.ImageFolderClasses(root, "train")
    again.seed = 7
    again.use_class_balanced_batches(7, 3)
    assert [again[i]["image_id"] for i in reversed(range(70))] == order[::-1]
    again.seed = 8
    assert [again[i]["image_id"] for i in range(70)] != order
    with pytest.raises(ValueError, match="classes_per_batch"):
        train.use_class_balanced_batches(batch_size=4, classes_per_batch=1)


# ----------------------------------------------------------------------------- triplet loss


def triplet_loss_loop(codes, labels, margin):
    """The seed's triplets listed by hand: per class, each pair (a < p), every negative."""
    total, count = 0.0, 0
    labels = labels.tolist()
    for c in set(labels):
        members = [i for i, label in enumerate(labels) if label == c]
        negatives = [i for i, label in enumerate(labels) if label != c]
        for a, p in itertools.combinations(members, 2):
            for n in negatives:
                d_ap = float(((codes[a] - codes[p]) ** 2).sum())
                d_an = float(((codes[a] - codes[n]) ** 2).sum())
                total += max(0.0, d_ap - d_an + margin)
                count += 1
    return total / count if count else 0.0


def test_triplet_loss_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        b = int(torch.randint(2, 10, (1,), generator=g))
        codes = torch.tanh(torch.randn(b, 6, generator=g, dtype=torch.float64))
        labels = torch.randint(0, 3, (b,), generator=g)
        margin = [0.5, 2.0, 8.0][trial % 3]
        ours = hashing.batch_all_triplet_loss(codes, labels, margin)
        assert ours.dtype == torch.float64
        assert math.isclose(float(ours), triplet_loss_loop(codes, labels, margin), abs_tol=1e-12)
    # the order of the batch matters as in the seed: the earlier image is the anchor
    codes = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    assert float(hashing.batch_all_triplet_loss(codes, labels, 0.0)) == 0.0  # 1 - 9 < 0
    assert float(hashing.batch_all_triplet_loss(codes[[1, 0, 2]], labels, 0.0)) == 0.0
    assert float(hashing.batch_all_triplet_loss(codes, labels, 9.0)) == 1.0
    no_triplet = torch.zeros(3, 4, requires_grad=True)
    loss = hashing.batch_all_triplet_loss(no_triplet, torch.tensor([0, 1, 2]), 1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and no_triplet.grad is not None


def test_triplet_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    assert torch.autograd.gradcheck(
        lambda x: hashing.batch_all_triplet_loss(x, labels, 1.5), (codes,)
    )


def test_next_positive_indices():
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    assert hashing.next_positive_indices(labels).tolist() == [2, 4, 5, 3, 1, 0]


# ----------------------------------------------------------------------------- Hamming mAP


def map_brute_force(q, d, ql, dl, top_k=None, exclude=None):
    aps = []
    for i in range(len(q)):
        ranking = sorted(
            (int((q[i] != d[j]).sum()), j)
            for j in range(len(d))
            if exclude is None or exclude[i] != j
        )
        ranking = ranking if top_k is None else ranking[:top_k]
        hits, total = 0, 0.0
        for rank, (_, j) in enumerate(ranking, 1):
            if dl[j] == ql[i]:
                hits += 1
                total += hits / rank
        aps.append(total / hits if hits else 0.0)
    return float(np.mean(aps))


def test_hamming_map_tie_rule_by_hand():
    # database at distances 1, 0, 1, 0 from the query; relevant: items 0 and 3.
    q = torch.tensor([[1.0, 1.0]])
    d = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]])
    labels_d = torch.tensor([5, 6, 6, 5])
    # ranking by (distance, index): 1, 3, 0, 2 -> relevant at ranks 2 and 3
    expected = (1 / 2 + 2 / 3) / 2
    assert math.isclose(test_retrieval.hamming_map(q, d, [5], labels_d), expected)
    assert math.isclose(test_retrieval.hamming_map(q, d, [5], labels_d, top_k=2), 1 / 2)
    assert test_retrieval.hamming_map(q, d, [5], labels_d, top_k=1) == 0.0
    # excluding item 1 moves the relevant items to ranks 1 and 2
    assert test_retrieval.hamming_map(q, d, [5], labels_d, exclude_indices=[1]) == 1.0
    assert math.isclose(test_retrieval.hamming_precision_at_k(q, d, [5], labels_d, 3), 2 / 3)


def test_hamming_map_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    for trial in range(25):
        bits = int(torch.randint(1, 7, (1,), generator=g))
        n_q, n_d = (
            int(torch.randint(1, 9, (1,), generator=g)),
            int(torch.randint(1, 30, (1,), generator=g)),
        )
        q = torch.randint(0, 2, (n_q, bits), generator=g).float() * 2 - 1
        d = torch.randint(0, 2, (n_d, bits), generator=g).float() * 2 - 1
        ql = torch.randint(0, 4, (n_q,), generator=g) * 10  # arbitrary label values
        dl = torch.randint(0, 4, (n_d,), generator=g) * 10
        exclude = torch.randint(-1, n_d, (n_q,), generator=g)
        for top_k in (None, 1, 4, n_d + 3):
            for ex in (None, exclude):
                ours = test_retrieval.hamming_map(q, d, ql, dl, top_k=top_k, exclude_indices=ex)
                ref = map_brute_force(q, d, ql, dl, top_k, None if ex is None else ex.tolist())
                assert math.isclose(ours, ref, abs_tol=1e-12), (trial, top_k)
        # chunks of one query give the same per-query APs
        one = test_retrieval.hamming_ranking_metrics(q, d, ql, dl, chunk_elements=1)["ap"]
        assert math.isclose(float(one.mean()), map_brute_force(q, d, ql, dl), abs_tol=1e-12)


def test_hamming_map_refuses_codes_that_are_not_signs():
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        test_retrieval.hamming_map(torch.zeros(1, 4), torch.ones(2, 4), [0], [0, 1])


def test_hamming_top_k_orders_ties_by_index():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 2, (5, 4), generator=g).float() * 2 - 1
    d = torch.randint(0, 2, (40, 4), generator=g).float() * 2 - 1
    distances, indices = test_retrieval.hamming_top_k(q, d, 10, chunk_elements=40)
    for i in range(5):
        ranking = sorted((int((q[i] != d[j]).sum()), j) for j in range(40))[:10]
        assert indices[i].tolist() == [j for _, j in ranking]
        assert distances[i].tolist() == [h for h, _ in ranking]


def test_binarize_maps_zero_to_minus_one():
    codes = torch.tensor([[0.3, 0.0, -0.2, -0.0]])
    assert hashing.binarize(codes).tolist() == [[1.0, -1.0, -1.0, -1.0]]


# ------------------------------------------------------------------------- module contract


def test_optimizer_follows_the_seed_schedule():
    args = hashing_args(learning_rate=1e-4, hash_warmup_steps=10)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = hashing.build_optimizer(args, model)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the seed's AdamInverseSqrtWithWarmup: linear from 1e-7, then lr * sqrt(warmup / step)
    step_size = (1e-4 - 1e-7) / 10
    for n, lr in enumerate(lrs):
        expected = 1e-7 + n * step_size if n < 10 else 1e-4 * math.sqrt(10 / n)
        assert math.isclose(lr, expected, rel_tol=1e-9)


def test_defaults_and_flags():
    args = hashing_args()
    assert (args.hash_backbone, args.hash_bits, args.classes_per_batch) == ("resnet18", 32, 2)
    assert hashing.triplet_margin(args) == 8.0  # bits / 4, the seed's 8 at 32 bits
    assert hashing.DEFAULTS["learning_rate"] == 1e-3  # the seed run behind its table


@pytest.fixture
def folder_task(tmp_path):
    root = make_image_folder(str(tmp_path / "f"), classes=("a", "b", "c"), train=4, test=2)
    args = hashing_args(dataset_path=root, hash_bits=16, batch_size=6, classes_per_batch=3)
    torch.manual_seed(0)
    train, test = hashing.build_datasets(args)
    return args, train, test, hashing.build_model(args, train)


def test_forward_contract_and_double_backward(folder_task):
    args, train, _, model = folder_task
    args.ga_adv_eps = 1e-3
    batch = train.collate_fn([train[i] for i in range(args.batch_size)])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (6, 3, 32, 32)
    model.train()
    out = hashing.forward(model, batch, args, torch.device("cpu"))
    loss = out["losses"]["triplet"]
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    a, b = out["sim"]
    assert a.shape == b.shape == (6, 16)
    x = out["adv_input"]
    assert x.is_leaf and x.requires_grad and x.shape == (6, 3, 32, 32)
    # as main does for L_GA^A: dL/dx with create_graph, then backward through a norm of it
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = grad_x.abs().sum()
    penalty.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    # FGSM's second forward uses the given input
    again = hashing.forward(model, batch, args, torch.device("cpu"), adv_input=x.detach() + 0.01)
    assert torch.isfinite(again["losses"]["triplet"])
    args.ga_adv_eps = 0.0
    assert not hashing.forward(model, batch, args, torch.device("cpu"))["adv_input"].requires_grad


def test_evaluate_returns_the_metrics(folder_task):
    args, train, test, model = folder_task
    model.eval()
    with torch.no_grad():
        result = hashing.evaluate(model, train, test, args, torch.device("cpu"))
    for split in ("train", "test"):
        assert set(result[split]) == {"mAP", "mAP@100", "P@100", "M"}
        assert all(0.0 <= v <= 100.0 for v in result[split].values())
        assert result[split]["M"] == result[split]["mAP"]
    # M_t recomputed from codes encoded here
    with torch.no_grad():
        db = hashing.binarize(model(hashing.normalize_images(torch.stack(
            [train.get_img(i) for i in range(len(train.imgs))]))))  # fmt: skip
        queries = hashing.binarize(model(hashing.normalize_images(torch.stack(
            [test.get_img(i) for i in range(len(test.imgs))]))))  # fmt: skip
    expected = map_brute_force(queries, db, test.labels, train.labels)
    assert math.isclose(result["test"]["mAP"], 100 * expected, rel_tol=1e-9)
    sample = hashing.fixed_train_sample(len(train.imgs), args.train_eval_queries)
    assert len(sample) == 5 and len(set(sample.tolist())) == 5
    expected_s = map_brute_force(
        db[sample], db, [train.labels[i] for i in sample], train.labels, exclude=sample.tolist()
    )
    assert math.isclose(result["train"]["mAP"], 100 * expected_s, rel_tol=1e-9)


def test_vit_backbone_builds_and_runs():
    model = hashing.HashingModel("vit_b_32", 48, pretrained=False, image_size=32).eval()
    with torch.no_grad():
        codes = model(torch.randn(2, 3, 32, 32))
    assert codes.shape == (2, 48) and bool((codes.abs() < 1).all())


def test_pretrained_without_cached_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(hashing.PretrainedWeightsMissing, match=r"resnet18-f37072fd\.pth"):
        hashing.HashingModel("resnet18", 32, pretrained=True)
    with pytest.raises(hashing.PretrainedWeightsMissing, match=r"vit_b_32.*--pretrained False"):
        hashing.HashingModel("vit_b_32", 32, pretrained=True, image_size=32)


def test_seed_reference_numbers_read_like_the_paper_table():
    import whm

    path = os.path.join(os.path.dirname(hashing.__file__), "hashing_results.csv")
    table = whm.paper_table("hashing_seed", path=path)
    cub = table[("CUB-200-2011", "Image-Retrieve ResNet-18 triplet")]
    assert cub == {
        "mAP_16bits": 65.6,
        "mAP_32bits": 69.11,
        "mAP_48bits": 69.41,
        "mAP_64bits": 70.47,
    }
    assert table[("Stanford Dogs", "Image-Retrieve ResNet-18 triplet")]["mAP_64bits"] == 71.23


def test_main_runs_hashing_end_to_end_with_ga(tmp_path):
    """``main.main`` on the synthetic hashing set: metrics.jsonl with mAP per split and WHM,
    the checkpoints and TensorBoard's train/ and eval/ scalars; the same seed, the same file."""
    import json

    from tb_events import read_scalars

    import main

    lines = []
    for attempt in ("a", "b"):
        log_dir = tmp_path / attempt
        argv = ["--dataset", "hashing_synthetic", "--data_dir", str(tmp_path / "data"),
                "--log_dir", str(log_dir), "--num_iters", "4", "--eval_every", "2",
                "--batch_size", "8", "--classes_per_batch", "4", "--loader_num_workers", "0",
                "--train_eval_queries", "40", "--hash_warmup_steps", "2", "--ga"]  # fmt: skip
        result = main.main(argv)
        (run_dir,) = log_dir.iterdir()
        lines.append((run_dir / "metrics.jsonl").read_text())
    records = [json.loads(line) for line in lines[0].splitlines()]
    assert [(r["iteration"], r["split"]) for r in records] == [
        (2, "train"), (2, "test"), (4, "train"), (4, "test")
    ]  # fmt: skip
    for r in records:
        assert r["synthetic"] is True and 0 <= r["mAP"] <= 100 and r["M"] == r["mAP"]
        assert {"M_s", "M_t", "WHM", "P@100", "mAP@100"} <= set(r)
    assert records[-1]["M_t"] == pytest.approx(result["test"]["M"])
    assert lines[0] == lines[1]  # same seed, same metrics
    assert {"triplet", "sim", "ga_adv", "ga_iso"} <= set(records[2]["loss"])
    for name in ("latest.pt", "best.pt"):
        state = torch.load(run_dir / name, weights_only=True)
        assert state["iteration"] in (2, 4) and state["args"]["dataset"] == "hashing_synthetic"
    scalars = read_scalars(run_dir)
    assert {"train/triplet", "train/ga_adv", "eval/test/mAP", "eval/WHM"} <= set(scalars)
