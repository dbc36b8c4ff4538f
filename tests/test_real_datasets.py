"""MIT-States, Fashion200k and FashionIQ on tiny fixtures the tests write in the real layouts.

Each fixture has a few dozen small generated images, the label/caption/split files and test
query files of the public release; the bad-input tests break one thing at a time.
"""

import io
import json
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision

import datasets
import img_text_composition_models
import main
import test_retrieval

# --------------------------------------------------------------------------- fixture builders


def save_image(path, seed, size=(40, 30)):
    """A small smooth colour image (JPEG or PNG by extension)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    img = PIL.Image.fromarray(small).resize(size, PIL.Image.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, quality=90)


def huge_png_bytes(width, height):
    """A valid PNG header claiming width x height pixels (the pixel data is never decoded)."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def truncate_file(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


MIT_TRAIN = {"apple": ["ripe", "sliced", "rotten"], "bread": ["fresh", "moldy"]}
MIT_TEST = {"armor": ["ancient", "dented", "shiny"], "bracelet": ["broken", "golden"]}


def make_mitstates(root, per_folder=2):
    images = os.path.join(root, "images")
    seed = 0
    for nouns in (MIT_TRAIN, MIT_TEST):
        for noun, adjs in nouns.items():
            for adj in adjs:
                for k in range(per_folder):
                    seed += 1
                    save_image(os.path.join(images, f"{adj} {noun}", f"img_{k}.jpg"), seed)
    # Entries the loader must pass over: TIRG's 'adj <noun>' folders (no state), folders
    # without a space, and files that are not JPEGs.
    save_image(os.path.join(images, "adj apple", "img_0.jpg"), 900)
    save_image(os.path.join(images, "misc", "img_0.jpg"), 901)
    with open(os.path.join(images, "ripe apple", "notes.txt"), "w") as f:
        f.write("not an image")
    return str(root)


F200K_TRAIN = {
    "dress": [
        ("women/dresses/casual/1/1_0.jpeg", "black midi dress"),
        ("women/dresses/casual/2/2_0.jpeg", "black midi dress"),
        ("women/dresses/casual/3/3_0.jpeg", "red midi dress"),
        ("women/dresses/casual/4/4_0.jpeg", "black lace dress"),
        ("women/dresses/casual/5/5_0.jpeg", "green wool coat"),
    ],
    "top": [
        ("women/tops/blouses/6/6_0.jpeg", "red embroidered top"),
        ("women/tops/blouses/7/7_0.jpeg", "blue embroidered top"),
        ("women/tops/blouses/8/8_0.jpeg", "v-neck top w. belt"),
    ],
}
F200K_TEST = {
    "dress": [
        ("women/dresses/t/11/11_0.jpeg", "black midi dress"),
        ("women/dresses/t/12/12_0.jpeg", "red midi dress"),
        ("women/dresses/t/13/13_0.jpeg", "red midi dress"),
        ("women/dresses/t/14/14_0.jpeg", "black lace dress"),
    ]
}
F200K_QUERIES = [
    ("women/dresses/t/11/11_0.jpeg", "women/dresses/t/12/12_0.jpeg"),
    ("women/dresses/t/14/14_0.jpeg", "women/dresses/t/11/11_0.jpeg"),
]
# Every (source caption, target caption, text) a training query may be. The embroidered pair
# is one TIRG's str.replace parent index misses ('red' is also cut out of 'embroidered').
F200K_TRAIN_PAIRS = {
    ("black midi dress", "red midi dress", "replace black with red"),
    ("red midi dress", "black midi dress", "replace red with black"),
    ("black midi dress", "black lace dress", "replace midi with lace"),
    ("black lace dress", "black midi dress", "replace lace with midi"),
    ("red embroidered top", "blue embroidered top", "replace red with blue"),
    ("blue embroidered top", "red embroidered top", "replace blue with red"),
}


def make_fashion200k(root):
    os.makedirs(os.path.join(root, "labels"))
    seed = 100
    for split, files in (("train", F200K_TRAIN), ("test", F200K_TEST)):
        for category, rows in files.items():
            label_file = os.path.join(root, "labels", f"{category}_{split}_detect_all.txt")
            with open(label_file, "w") as f:
                for path, caption in rows:
                    f.write(f"{path}\t0.{seed % 10}\t{caption}\n")
                    save_image(os.path.join(root, path), seed)
                    seed += 1
    with open(os.path.join(root, "test_queries.txt"), "w") as f:
        f.writelines(f"{s} {t}\n" for s, t in F200K_QUERIES)
    return str(root)


def fiq_id(category, split, k):
    return f"B{category[:2].upper()}{split[:2].upper()}{k:04d}"


def make_fashioniq(root, n_images=4):
    for d in ("captions", "image_splits", "images"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    seed = 200
    for category in datasets.FASHIONIQ_CATEGORIES:
        for split, n_triplets in (("train", 3), ("val", 2)):
            ids = [fiq_id(category, split, k) for k in range(n_images)]
            for image_id in ids:
                save_image(os.path.join(root, "images", f"{image_id}.png"), seed, (30, 40))
                seed += 1
            split_file = os.path.join(root, "image_splits", f"split.{category}.{split}.json")
            with open(split_file, "w") as f:
                json.dump(ids, f)
            triplets = [
                {
                    "candidate": ids[k],
                    "target": ids[k + 1],
                    "captions": [f"Is {category} {k} darker", f"has longer sleeves {k}."],
                }
                for k in range(n_triplets)
            ]
            with open(os.path.join(root, "captions", f"cap.{category}.{split}.json"), "w") as f:
                json.dump(triplets, f, indent=1)
    return str(root)


@pytest.fixture
def mit_dir(tmp_path):
    return make_mitstates(tmp_path / "mitstates")


@pytest.fixture
def f200k_dir(tmp_path):
    return make_fashion200k(tmp_path / "fashion200k")


@pytest.fixture
def fiq_dir(tmp_path):
    return make_fashioniq(tmp_path / "fashioniq")


def transform():
    return datasets.ResizeCenterCrop(32)


# --------------------------------------------------------------------------- MIT-States


def test_tirg_test_nouns_are_the_49():
    assert len(datasets.TIRG_TEST_NOUNS) == len(set(datasets.TIRG_TEST_NOUNS)) == 49
    assert not set(MIT_TRAIN) & set(datasets.TIRG_TEST_NOUNS)
    assert set(MIT_TEST) <= set(datasets.TIRG_TEST_NOUNS)


def test_mitstates_splits_queries_and_texts(mit_dir):
    train = datasets.MITStates(mit_dir, "train", transform())
    test = datasets.MITStates(mit_dir, "test", transform())
    assert len(train.imgs) == 10 and len(test.imgs) == 10  # 'adj apple', misc, notes.txt skipped
    assert {img["noun"] for img in train.imgs} == set(MIT_TRAIN)
    # Folders are read in sorted order, so the adjectives are too.
    assert train.noun2adjs == {noun: sorted(adjs) for noun, adjs in MIT_TRAIN.items()}
    assert test.noun2adjs == {noun: sorted(adjs) for noun, adjs in MIT_TEST.items()}
    assert train.get_test_queries() == []
    queries = test.get_test_queries()
    assert len(queries) == 6 * 2 + 4 * 1  # every test image x every other adjective of its noun
    q = queries[0]
    assert test.imgs[q["source_img_id"]]["captions"] == ["ancient armor"]
    assert (q["mod"]["str"], q["target_caption"]) == ("dented", "dented armor")
    assert sorted(train.get_all_texts()) == sorted(img["captions"][0] for img in train.imgs)
    assert test.extra_label_views()["adj"]("dented armor") == "dented"
    assert test.extra_label_views()["noun"]("dented armor") == "armor"
    assert test.evaluation_groups()[0]["queries"] is queries
    assert test.recall_ks == (1, 5, 10)


def test_mitstates_training_pairs_share_source_and_differ_in_adjective(mit_dir):
    ds = datasets.MITStates(mit_dir, "train", transform())
    queries = [ds.sample_query(i) for i in range(400)]
    assert queries == [ds.sample_query(i) for i in range(400)]  # a function of (seed, index)
    assert queries != [ds.sample_query(i, seed=1) for i in range(400)]
    sources = set()
    for a, b in zip(queries[0::2], queries[1::2]):
        assert a["source_img_id"] == b["source_img_id"]
        src = ds.imgs[a["source_img_id"]]
        sources.add(a["source_img_id"])
        for q in (a, b):
            tgt = ds.imgs[q["target_img_id"]]
            assert tgt["noun"] == src["noun"] and tgt["adj"] != src["adj"]
            assert q["mod"]["str"] == tgt["adj"] and q["target_caption"] == tgt["captions"][0]
        if len(ds.noun2adjs[src["noun"]]) >= 3:
            assert a["mod"]["str"] != b["mod"]["str"]
    assert len(sources) == len(ds.imgs)
    item = ds[3]
    assert item["source_img_data"].shape == (3, 32, 32)
    assert item["source_img_data"].dtype == torch.uint8


def test_mitstates_complete_text_query_is_adj_noun(mit_dir):
    train = datasets.MITStates(mit_dir, "train", use_complete_text_query=True)
    test = datasets.MITStates(mit_dir, "test", use_complete_text_query=True)
    q = train.sample_query(0)
    assert q["mod"]["str"] == q["target_caption"] == train.imgs[q["target_img_id"]]["captions"][0]
    assert all(q["mod"]["str"] == q["target_caption"] for q in test.get_test_queries())
    assert test.get_test_queries()[0]["mod"]["str"] == "dented armor"


def test_mitstates_hits_are_judged_by_caption(mit_dir, monkeypatch):
    """Any image of the target caption is a hit, not only one image; the source is excluded."""
    test = datasets.MITStates(mit_dir, "test")
    queries = test.get_test_queries()
    labels = test.gallery_labels()
    query_labels, gallery_labels = test_retrieval._label_ids(
        [test.query_label(q) for q in queries], labels
    )
    # Gallery features: one direction per caption; each query points at its caption's direction.
    captions = sorted(set(labels))
    gallery = torch.stack([torch.eye(len(captions))[captions.index(c)] for c in labels])
    query = torch.stack(
        [torch.eye(len(captions))[captions.index(test.query_label(q))] for q in queries]
    )
    recall = test_retrieval.recall_at_k(
        query,
        gallery,
        query_labels,
        gallery_labels,
        [1],
        exclude_indices=[q["source_img_id"] for q in queries],
    )
    assert recall[1] == 1.0
    # Pointing each query at its own source caption is never a hit.
    query = torch.stack(
        [torch.eye(len(captions))[captions.index(labels[q["source_img_id"]])] for q in queries]
    )
    recall = test_retrieval.recall_at_k(
        query,
        gallery,
        query_labels,
        gallery_labels,
        [1, 5],
        exclude_indices=[q["source_img_id"] for q in queries],
    )
    assert recall[1] == 0.0


def test_mitstates_bad_layouts(tmp_path, mit_dir):
    with pytest.raises(FileNotFoundError, match="(?s)is not a folder.*Expected layout"):
        datasets.MITStates(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"(?s)empty/images is not a folder.*<adj> <noun>"):
        datasets.MITStates(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "empty" / "images")
    with pytest.raises(datasets.DatasetFormatError, match="no '<adj> <noun>/\\*.jpg' images"):
        datasets.MITStates(str(tmp_path / "empty"))
    save_image(os.path.join(mit_dir, "images", "big red apple", "0.jpg"), 5)
    with pytest.raises(datasets.DatasetFormatError, match="big red apple: expected a folder"):
        datasets.MITStates(mit_dir)
    os.remove(os.path.join(mit_dir, "images", "big red apple", "0.jpg"))
    os.rmdir(os.path.join(mit_dir, "images", "big red apple"))
    save_image(os.path.join(mit_dir, "images", "wet cat", "0.jpg"), 6)
    with pytest.raises(datasets.DatasetFormatError, match="noun 'cat' has images of a single"):
        datasets.MITStates(mit_dir)
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.MITStates(mit_dir, "val")


# --------------------------------------------------------------------------- Fashion200k


def test_fashion200k_train_index_and_texts(f200k_dir):
    ds = datasets.Fashion200k(f200k_dir, "train", transform())
    assert len(ds.imgs) == 8
    assert ds.imgs[0]["file_path"] == "women/dresses/casual/1/1_0.jpeg"
    assert ds.imgs[0]["detection_score"] == pytest.approx(0.0)
    assert ds.imgs[7]["captions"] == ["v-neck top wdotmark belt"]  # TIRG's '.' -> 'dotmark'
    assert [img["modifiable"] for img in ds.imgs] == [True] * 4 + [False, True, True, False]
    seen = set()
    for i in range(600):
        q = ds.sample_query(i)
        triple = (ds.imgs[q["source_img_id"]]["captions"][0], q["target_caption"], q["mod"]["str"])
        assert triple in F200K_TRAIN_PAIRS
        assert ds.imgs[q["target_img_id"]]["captions"][0] == q["target_caption"]
        seen.add(triple)
    assert seen == F200K_TRAIN_PAIRS
    assert ds.sample_query(7) == ds.sample_query(7)
    # Queries are independent: the two of a pair do not share their source as MIT-States's do.
    pairs = [(ds.sample_query(2 * i), ds.sample_query(2 * i + 1)) for i in range(20)]
    assert any(a["source_img_id"] != b["source_img_id"] for a, b in pairs)
    assert ds.get_all_texts()[0] == "black midi dress"
    assert ds.recall_ks == (1, 10, 50)


def test_different_word_follows_tirg():
    assert datasets.different_word("black midi dress", "red midi dress") == ("black", "red")
    assert datasets.different_word("a b", "b a") == ("b", "a")  # no missing word: the last words


def test_fashion200k_test_queries_and_caption_hits(f200k_dir):
    ds = datasets.Fashion200k(f200k_dir, "test", transform())
    queries = ds.get_test_queries()
    assert [(q["source_img_id"], q["mod"]["str"], q["target_caption"]) for q in queries] == [
        (0, "replace black with red", "red midi dress"),
        (3, "replace lace with midi", "black midi dress"),
    ]
    # Query 0 targets image 1, but image 2 has the same caption: ranking it first is a hit.
    query_labels, gallery_labels = test_retrieval._label_ids(
        [ds.query_label(q) for q in queries], ds.gallery_labels()
    )
    gallery = torch.eye(4)
    query = torch.stack([gallery[2], gallery[0]])
    recall = test_retrieval.recall_at_k(query, gallery, query_labels, gallery_labels, [1])
    assert recall[1] == 1.0
    complete = datasets.Fashion200k(f200k_dir, "test", use_complete_text_query=True)
    assert [q["mod"]["str"] for q in complete.get_test_queries()] == [
        "red midi dress",
        "black midi dress",
    ]
    train = datasets.Fashion200k(f200k_dir, "train", use_complete_text_query=True)
    q = train.sample_query(0)
    assert q["mod"]["str"] == q["target_caption"]


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def test_fashion200k_bad_files(tmp_path, f200k_dir):
    with pytest.raises(FileNotFoundError, match=r"(?s)nothing_here is not a folder.*_detect_all"):
        datasets.Fashion200k(str(tmp_path / "nothing_here"))
    os.makedirs(tmp_path / "no_labels")
    with pytest.raises(FileNotFoundError, match=r"(?s)no_labels/labels is not a folder.*women/"):
        datasets.Fashion200k(str(tmp_path / "no_labels"))
    label = os.path.join(f200k_dir, "labels", "dress_train_detect_all.txt")
    good = open(label).read().splitlines()

    write_lines(label, good[:2] + ["women/dresses/x/9_0.jpeg\t0.5"] + good[2:])
    with pytest.raises(datasets.DatasetFormatError, match=f"{label}:3: expected"):
        datasets.Fashion200k(f200k_dir)
    write_lines(label, good[:1] + ["women/dresses/x/9_0.jpeg\thigh\tred dress"])
    with pytest.raises(datasets.DatasetFormatError, match=f"{label}:2: the detection score"):
        datasets.Fashion200k(f200k_dir)
    for escaping in ("/etc/passwd", "../outside/1.jpeg", "women/../../x.jpeg", "~/x.jpeg"):
        write_lines(label, good[:3] + [f"{escaping}\t0.5\tred dress"])
        with pytest.raises(datasets.DatasetFormatError, match=f"{label}:4: refusing the image"):
            datasets.Fashion200k(f200k_dir)
    write_lines(label, good)

    os.rename(
        os.path.join(f200k_dir, "labels", "dress_test_detect_all.txt"),
        os.path.join(f200k_dir, "labels", "dress_test_other.txt"),
    )
    with pytest.raises(FileNotFoundError, match=r"no .*labels/\*_test_detect_all.txt"):
        datasets.Fashion200k(f200k_dir, "test")
    os.rename(
        os.path.join(f200k_dir, "labels", "dress_test_other.txt"),
        os.path.join(f200k_dir, "labels", "dress_test_detect_all.txt"),
    )

    queries = os.path.join(f200k_dir, "test_queries.txt")
    write_lines(queries, [f"{F200K_QUERIES[0][0]} women/dresses/t/99/99_0.jpeg"])
    with pytest.raises(
        datasets.DatasetFormatError,
        match=f"{queries}:1: the image 'women/dresses/t/99/99_0.jpeg' is not",
    ):
        datasets.Fashion200k(f200k_dir, "test")
    write_lines(queries, [F200K_QUERIES[0][0]])
    with pytest.raises(datasets.DatasetFormatError, match=f"{queries}:1: expected"):
        datasets.Fashion200k(f200k_dir, "test")
    os.remove(queries)
    with pytest.raises(FileNotFoundError, match="test_queries.txt"):
        datasets.Fashion200k(f200k_dir, "test")
    datasets.Fashion200k(f200k_dir, "train")  # the train split does not need the test queries


# --------------------------------------------------------------------------- FashionIQ


def test_fashioniq_train_and_per_category_protocol(fiq_dir):
    train = datasets.FashionIQ(fiq_dir, "train", transform())
    test = datasets.FashionIQ(fiq_dir, "test", transform())
    assert len(train.imgs) == len(test.imgs) == 12
    assert len(train.triplets) == 9 and len(test.get_test_queries()) == 6
    q = test.get_test_queries()[0]
    assert q["mod"]["str"] == "dress is dress 0 darker and it has longer sleeves 0."
    assert q["target_caption"] == fiq_id("dress", "val", 1)  # hits are judged by image id
    assert test.gallery_labels()[:2] == [fiq_id("dress", "val", 0), fiq_id("dress", "val", 1)]
    assert test.query_label(q) == test.gallery_labels()[q["target_img_id"]]
    groups = test.evaluation_groups()
    assert [g["name"] for g in groups] == ["dress", "shirt", "toptee"]
    for g in groups:  # each category: its own queries, its whole val split as the gallery
        assert len(g["queries"]) == 2 and len(g["gallery_ids"]) == 4
        assert {test.imgs[i]["category"] for i in g["gallery_ids"]} == {g["name"]}
        assert all(q["category"] == g["name"] for q in g["queries"])
    assert test.recall_ks == (10, 50) and not test.exclude_source_in_test
    texts = train.get_all_texts()
    assert len(texts) == 9 and texts[0].startswith("dress is dress 0")
    for i in range(50):
        q = train.sample_query(i)
        assert any(
            q["source_img_id"] == t["source_img_id"] and q["mod"] == t["mod"]
            for t in train.triplets
        )
    assert train[0]["target_img_data"].shape == (3, 32, 32)
    shirts = datasets.FashionIQ(fiq_dir, "val", category="shirt")
    assert [g["name"] for g in shirts.evaluation_groups()] == ["shirt"]
    assert len(shirts.imgs) == 4 and len(shirts.get_test_queries()) == 2
    same = datasets.FashionIQ(fiq_dir, "test", use_complete_text_query=True)
    # FashionIQ has no target description: the complete text query is the captions, unchanged.
    assert same.get_test_queries()[0]["mod"] == test.get_test_queries()[0]["mod"]


def test_fashioniq_bad_files(tmp_path, fiq_dir):
    os.makedirs(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="(?s)none/images is not a folder.*cap.<category>"):
        datasets.FashionIQ(str(tmp_path / "none"), "train")
    cap = os.path.join(fiq_dir, "captions", "cap.shirt.val.json")
    entries = json.load(open(cap))
    with open(cap, "w") as f:
        f.write('[{"candidate": "x",\n "target": }]')
    with pytest.raises(datasets.DatasetFormatError, match=f"{cap}:2: not valid JSON"):
        datasets.FashionIQ(fiq_dir, "test")
    json.dump([dict(entries[0], target="B_UNKNOWN")], open(cap, "w"))
    with pytest.raises(
        datasets.DatasetFormatError,
        match="entry 0: the target image 'B_UNKNOWN' is not in .*split.shirt.val",
    ):
        datasets.FashionIQ(fiq_dir, "test")
    json.dump([dict(entries[0], candidate="../../etc/passwd")], open(cap, "w"))
    with pytest.raises(datasets.DatasetFormatError, match="refusing the image id '../../etc"):
        datasets.FashionIQ(fiq_dir, "test")
    json.dump([{"candidate": entries[0]["candidate"], "captions": "one string"}], open(cap, "w"))
    with pytest.raises(datasets.DatasetFormatError, match="entry 0: expected"):
        datasets.FashionIQ(fiq_dir, "test")
    os.remove(cap)
    with pytest.raises(FileNotFoundError, match="cap.shirt.val.json not found"):
        datasets.FashionIQ(fiq_dir, "test")
    datasets.FashionIQ(fiq_dir, "test", category="dress")  # other categories do not need it
    with pytest.raises(ValueError, match="category"):
        datasets.FashionIQ(fiq_dir, "test", category="shoes")


# --------------------------------------------------------------------------- bad images


def test_undecodable_and_truncated_images_are_skipped_deterministically(mit_dir):
    bad_files = [
        os.path.join(mit_dir, "images", "ripe apple", "img_0.jpg"),
        os.path.join(mit_dir, "images", "fresh bread", "img_1.jpg"),
    ]
    with open(bad_files[0], "wb") as f:
        f.write(b"this is not a jpeg")
    truncate_file(bad_files[1])
    ds = datasets.MITStates(mit_dir, "train", transform())
    bad_ids = {i for i, img in enumerate(ds.imgs) if img["file_path"] in bad_files}
    assert len(bad_ids) == 2
    with pytest.warns(datasets.BadImageWarning) as record:
        items = [ds[i] for i in range(120)]
    assert {str(w.message).split(":")[1].strip() for w in record} <= set(bad_files)
    assert any(bad_files[0] in str(w.message) for w in record)
    assert ds.bad_image_count() == 2 and sorted(ds.bad_image_paths()) == sorted(bad_files)
    for item in items:
        assert item["source_img_id"] not in bad_ids and item["target_img_id"] not in bad_ids
    # The replacement query depends on (seed, index) only, not on what this process has seen.
    fresh = datasets.MITStates(mit_dir, "train", transform())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datasets.BadImageWarning)
        for i in reversed(range(120)):
            again = fresh[i]
            assert again["source_img_id"] == items[i]["source_img_id"]
            assert again["target_img_id"] == items[i]["target_img_id"]
            assert torch.equal(again["target_img_data"], items[i]["target_img_data"])
    # At evaluation a bad image is a mean-grey image of the right size.
    grey = ds.get_img(min(bad_ids))
    assert grey.shape == (3, 32, 32)
    assert grey[:, 0, 0].tolist() == [124, 116, 104] and (grey == grey[:, :1, :1]).all()

    strict = datasets.MITStates(mit_dir, "train", transform(), on_bad_image="fail")
    for bad_id in bad_ids:
        with pytest.raises(datasets.BadImageError, match=strict.imgs[bad_id]["file_path"]):
            strict.get_img(bad_id)
    with pytest.raises(datasets.BadImageError, match="cannot decode image"):
        for i in range(120):
            strict[i]
    with pytest.raises(ValueError, match="on_bad_image"):
        datasets.MITStates(mit_dir, "train", on_bad_image="ignore")


def test_images_found_bad_in_loader_workers_are_counted_in_the_main_process(mit_dir):
    with open(os.path.join(mit_dir, "images", "sliced apple", "img_1.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    ds = datasets.MITStates(mit_dir, "train", transform())
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=8,
        sampler=range(160),
        num_workers=2,
        collate_fn=datasets.collate_queries,
        worker_init_fn=datasets.worker_init,
        persistent_workers=True,
        prefetch_factor=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datasets.BadImageWarning)
        batches = list(loader)
    assert len(batches) == 20 and batches[0]["source_img_data"].shape == (8, 3, 32, 32)
    assert ds.bad_image_count() == 1  # flagged in a worker, seen here
    assert "1 in train" in datasets.bad_image_summary(ds)
    assert datasets.bad_image_summary(datasets.MITStates(mit_dir, "test")) is None


def test_image_bombs_are_refused_before_decoding(fiq_dir):
    ds = datasets.FashionIQ(fiq_dir, "test", transform(), on_bad_image="fail")
    victims = {0: (40000, 40000), 1: (12000, 8000)}  # above 2x and above 1x PIL's limit
    for idx, (w, h) in victims.items():
        with open(ds.image_path(idx), "wb") as f:
            f.write(huge_png_bytes(w, h))
        with pytest.raises(datasets.BadImageError, match=f"{ds.image_path(idx)}: refusing"):
            ds.get_img(idx)
    small_limit = datasets.FashionIQ(
        fiq_dir, "test", transform(), max_image_pixels=1000, on_bad_image="fail"
    )
    with pytest.raises(datasets.BadImageError, match=r"30x40 image \(1200 pixels, limit 1000\)"):
        small_limit.get_img(2)
    skipping = datasets.FashionIQ(fiq_dir, "test", transform())
    with pytest.warns(datasets.BadImageWarning, match="refusing"):
        assert skipping.get_img(0).shape == (3, 32, 32)
    assert skipping.bad_image_count() == 1
    missing = datasets.FashionIQ(fiq_dir, "test", transform(), on_bad_image="fail")
    os.remove(missing.image_path(3))
    with pytest.raises(datasets.BadImageError, match="image file missing"):
        missing.get_img(3)


# --------------------------------------------------------------------------- images, transform


def test_resize_center_crop_matches_torchvision_and_pickles():
    rng = np.random.default_rng(0)
    reference = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(224),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.PILToTensor(),
        ]
    )
    ours = pickle.loads(pickle.dumps(datasets.ResizeCenterCrop(224)))
    for width, height in [(400, 300), (300, 400), (641, 479), (224, 224), (100, 150)]:
        small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        img = PIL.Image.fromarray(small).resize((width, height), PIL.Image.BICUBIC)
        out = ours(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        assert (out.int() - reference(img).int()).abs().max() <= 1
    assert ours(PIL.Image.new("L", (50, 60))).shape == (3, 224, 224)


def test_jpeg_draft_decodes_large_photos_at_reduced_scale(tmp_path):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    big = PIL.Image.fromarray(small).resize((1200, 900), PIL.Image.BICUBIC)
    path = str(tmp_path / "big.jpg")
    big.save(path, quality=92)
    assert datasets.load_rgb_image(path, draft_size=224).size == (300, 225)  # 1/4 scale
    assert datasets.load_rgb_image(path).size == (1200, 900)
    t = datasets.ResizeCenterCrop(224)
    drafted = t(datasets.load_rgb_image(path, draft_size=224)).float()
    full = t(datasets.load_rgb_image(path)).float()
    assert (drafted - full).abs().mean() < 2.0


# --------------------------------------------------------------------------- pretrained weights


def test_pretrained_backbone_comes_from_the_cache_only(tmp_path, monkeypatch, mit_dir, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(
        img_text_composition_models.PretrainedWeightsMissing,
        match="empty_torch_home/hub/checkpoints/resnet18-.*--pretrained False",
    ):
        img_text_composition_models.resnet18_backbone(True)
    # main: --pretrained is on by default for the real datasets, and the error is for people.
    with pytest.raises(SystemExit) as exit_info:
        main.main(
            [
                "--dataset",
                "mitstates",
                "--dataset_path",
                mit_dir,
                "--num_iters",
                "1",
                "--log_dir",
                str(tmp_path / "logs"),
                "--loader_num_workers",
                "0",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "empty_torch_home" in err and "--pretrained False" in err and "Traceback" not in err

    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = home / "hub" / "checkpoints" / os.path.basename(weights.url)
    os.makedirs(cache.parent)
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cache)
    loaded = img_text_composition_models.resnet18_backbone(True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- main end to end


@pytest.fixture
def one_thread():
    """On a shared 2-core machine one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "dataset,make,ks",
    [
        ("mitstates", make_mitstates, (1, 5, 10)),
        ("fashion200k", make_fashion200k, (1, 10, 50)),
        ("fashioniq", make_fashioniq, (10, 50)),
    ],
)
def test_main_trains_and_evaluates_on_each_dataset(tmp_path, dataset, make, ks):
    root = make(tmp_path / dataset)
    log_dir = tmp_path / "logs"
    main.main(
        [
            "--dataset",
            dataset,
            "--dataset_path",
            root,
            "--num_iters",
            "20",
            "--eval_every",
            "20",
            "--train_eval_queries",
            "20",
            "--batch_size",
            "4",
            "--image_size",
            "32",
            "--image_embed_dim",
            "32",
            "--loader_num_workers",
            "0",
            "--pretrained",
            "False",
            "--log_dir",
            str(log_dir),
            "--comment",
            dataset,
        ]
    )
    (run,) = os.listdir(log_dir)
    with open(log_dir / run / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert {m["split"] for m in lines} == {"train", "test"}
    assert all(m["iteration"] == 20 for m in lines)
    for m in lines:
        for k in ks:
            assert any(key.endswith(f"R@{k}") for key in m), (k, m)
        assert m["synthetic"] is False
    with open(log_dir / run / "args.json") as f:
        args = json.load(f)
    assert args["dataset"] == dataset and args["on_bad_image"] == "skip"


def test_parse_args_data_options():
    args = main.parse_args(["--dataset", "fashioniq", "--category_to_train", "dress"])
    assert args.pretrained is True and args.on_bad_image == "skip" and args.image_size == 224
    with pytest.raises(SystemExit):
        main.parse_args(["--dataset", "mitstates", "--category_to_train", "dress"])
    with pytest.raises(SystemExit):
        main.parse_args(["--dataset", "css3d", "--use_complete_text_query"])
    with pytest.raises(SystemExit):
        main.parse_args(["--on_bad_image", "ignore"])
    assert main.parse_args(["--dataset", "mitstates", "--pretrained", "False"]).pretrained is False


def test_missing_dataset_path_names_the_layout(capsys):
    with pytest.raises(SystemExit):
        main.main(["--dataset", "fashion200k", "--pretrained", "False"])
    assert "_detect_all.txt" in capsys.readouterr().err


def test_uint8_batches_collate(mit_dir):
    ds = datasets.MITStates(mit_dir, "train", transform())
    batch = datasets.collate_queries([ds[0], ds[1]])
    assert batch["source_img_data"].shape == (2, 3, 32, 32)
    assert batch["mod"] == [ds[0]["mod"]["str"], ds[1]["mod"]["str"]]
    buf = io.BytesIO()
    pickle.dump(ds, buf)  # the dataset (shared flags included) pickles for spawned workers


def test_loader_benchmark_runs_and_reports_json(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_loader",
        os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_loader.py"),
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(
        [
            "--num_images",
            "12",
            "--width",
            "64",
            "--height",
            "48",
            "--queries",
            "8",
            "--batch_size",
            "4",
            "--workers",
            "0",
            "--rounds",
            "1",
            "--dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert set(report["results"]) == {"tirg", "ours_w0_nodraft", "ours_w0"}
    assert report["results"]["ours_w0"]["rounds"][0]["images"] == 16
    assert json.loads(capsys.readouterr().out) == json.load(open(tmp_path / "r.json"))


# --------------------------------------------------------------------------- the M_s sample


@pytest.mark.parametrize(
    "cls, make, key",
    [
        # a query is what it asks for: MIT-States and Fashion200k judge hits by caption, so
        # (source, text) is the query whichever image of the target caption was drawn
        (datasets.MITStates, make_mitstates, lambda q: (q["source_img_id"], q["mod"]["str"])),
        (
            datasets.Fashion200k,
            make_fashion200k,
            lambda q: (q["source_img_id"], q["target_caption"], q["mod"]["str"]),
        ),
        (
            datasets.FashionIQ,
            make_fashioniq,
            lambda q: (q["source_img_id"], q["target_img_id"], q["mod"]["str"]),
        ),
    ],
)
def test_training_sample_is_distinct_queries_of_the_training_pool(tmp_path, cls, make, key):
    ds = cls(make(tmp_path / "data"), "train")
    drawn = [ds.sample_query(i) for i in range(3000)]
    pool = {key(q) for q in drawn}  # everything training draws, each once
    for n in (10_000, len(pool) - 1, 5):
        sample = ds.sample_training_queries(n, seed=10_000_019)
        keys = [key(q) for q in sample]
        assert len(keys) == len(set(keys)) == min(n, len(pool))  # without replacement
        assert set(keys) <= pool
        assert sample == ds.sample_training_queries(n, seed=10_000_019)
        for q in sample:  # the target image carries the target's label
            assert ds.imgs[q["target_img_id"]]["captions"][0] == q["target_caption"]
    assert {key(q) for q in ds.sample_training_queries(10_000, seed=3)} == pool
    assert ds.distinct_training_query_count() == len(pool)
