"""clip4cir.py: CIRR and CIRCO in their real JSON layouts (with bad entries), the metrics against
plain loops, the submission files against the servers' schema, both stages end to end through
main.main with the tiny open_clip config, and L_GA^A through attention against finite
differences. Nothing is downloaded: every CLIP is built with pretrained=None."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("open_clip")

import clip4cir  # noqa: E402
import datasets  # noqa: E402

TINY = ["--clip_model", "clip_tiny"]


def _png(path, rng, size=(40, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def write_cirr(root, n_images=(14, 12, 12), n_triplets=(16, 8, 6), seed=0):
    """A tiny CIRR in the rc2 layout under root/cirr/ (images under root/<split folder>)."""
    rng = np.random.default_rng(seed)
    pairid = 100
    for split, n_img, n_trip in zip(("train", "val", "test1"), n_images, n_triplets):
        folder = {"val": "dev"}.get(split, split)
        names = [f"{folder}-{i}-0-img{i % 2}" for i in range(n_img)]
        files = {name: f"./{folder}/{i % 3}/{name}.png" for i, name in enumerate(names)}
        for rel in files.values():
            _png(
                os.path.join(root, rel), rng, (int(rng.integers(24, 48)), int(rng.integers(24, 48)))
            )
        triplets = []
        for _ in range(n_trip):
            members = [names[int(i)] for i in rng.choice(n_img, 6, replace=False)]
            entry = {
                "pairid": pairid,
                "reference": members[0],
                "caption": f"edit {pairid}",
                "img_set": {"id": pairid, "members": members, "reference_rank": 0},
            }
            if split != "test1":
                entry["target_hard"] = members[1]
                entry["target_soft"] = {members[1]: 1.0}
            triplets.append(entry)
            pairid += 1
        for sub, name, content in (("captions", "cap", triplets), ("image_splits", "split", files)):
            os.makedirs(os.path.join(root, "cirr", sub), exist_ok=True)
            with open(os.path.join(root, "cirr", sub, f"{name}.rc2.{split}.json"), "w") as f:
                json.dump(content, f, indent=1)
    return root


def write_circo(root, n_images=60, seed=0):
    """A tiny CIRCO: annotations/{val,test}.json and a COCO unlabeled gallery of n_images."""
    rng = np.random.default_rng(seed)
    ids = [int(x) for x in rng.choice(10**6, n_images, replace=False)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    for im in images:
        path = os.path.join(root, "COCO2017_unlabeled", "unlabeled2017", im["file_name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    os.makedirs(os.path.join(root, "COCO2017_unlabeled", "annotations"), exist_ok=True)
    with open(
        os.path.join(root, "COCO2017_unlabeled", "annotations", "image_info_unlabeled2017.json"),
        "w",
    ) as f:
        json.dump({"images": images}, f)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, n in (("val", 5), ("test", 4)):
        entries = []
        for k in range(n):
            pick = [ids[int(i)] for i in rng.choice(n_images, 4, replace=False)]
            entry = {
                "id": k,
                "reference_img_id": pick[0],
                "relative_caption": f"has {k} dogs",
                "shared_concept": "dogs",
            }
            if split == "val":
                entry["target_img_id"] = pick[1]
                entry["gt_img_ids"] = pick[1 : 2 + k % 3]
            entries.append(entry)
        with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
            json.dump(entries, f, indent=1)
    return root


def _edit_json(path, change):
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f, indent=1)


# ----------------------------------------------------------------------------------- loaders


def test_cirr_loader_reads_the_rc2_layout(tmp_path):
    root = write_cirr(str(tmp_path / "cirr_dataset"))
    transform = datasets.ClipImageTransform(32, 1.25)
    train = datasets.CIRRDataset(root, "train", transform)
    val = datasets.CIRRDataset(root, "val", transform)
    test1 = datasets.CIRRDataset(root, "test1", transform)
    assert (len(train.imgs), len(train.queries), len(val.queries)) == (14, 16, 8)
    assert all(q["target"] == -1 for q in test1.queries)
    q = val.queries[0]
    assert q["reference"] not in q["members"] and len(q["members"]) == 5
    assert q["target"] in q["members"]
    img = val.get_img(0)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    # training items: a pure function of (seed, index), every triplet once per epoch
    items = [train[i]["triplet"] for i in range(16)]
    assert sorted(items) == list(range(16)) and items == [train[i]["triplet"] for i in range(16)]
    batch = train.collate_fn([train[0], train[1]])
    assert batch["reference_img_data"].shape == (2, 3, 32, 32) and len(batch["caption"]) == 2


def test_target_pad_pads_wide_images_to_the_ratio():
    t = datasets.ClipImageTransform(32, 1.25)
    wide = PIL.Image.new("RGB", (100, 40), (255, 255, 255))
    padded = t.pad(wide)
    assert padded.size == (100, 80)  # 100 / 1.25 = 80: 20 black rows above and below
    assert padded.getpixel((50, 5)) == (0, 0, 0) and padded.getpixel((50, 40)) == (255,) * 3
    assert t.pad(PIL.Image.new("RGB", (50, 45))).size == (50, 45)  # ratio 1.11: unchanged
    assert datasets.ClipImageTransform(32)(wide).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda c: c[2]["img_set"]["members"].append("nowhere-img0"),
            r"cap\.rc2\.val\.json: entry 2 \(pairid \d+\): img_set member 'nowhere-img0'",
        ),
        (
            lambda c: c[1].__setitem__("target_hard", "ghost"),
            r"cap\.rc2\.val\.json: entry 1 \(pairid \d+\): target_hard 'ghost'",
        ),
        (lambda c: c[0].pop("caption"), r"entry 0 \(pairid \d+\): missing caption"),
        (lambda c: c[4].__setitem__("caption", "  "), r"entry 4 \(pairid \d+\): empty caption"),
    ],
)
def test_cirr_bad_entries_name_file_and_entry(tmp_path, break_it, message):
    root = write_cirr(str(tmp_path / "c"))
    _edit_json(os.path.join(root, "cirr", "captions", "cap.rc2.val.json"), break_it)
    with pytest.raises(datasets.DatasetFormatError, match=message):
        datasets.CIRRDataset(root, "val", datasets.ClipImageTransform(32))


def test_cirr_malformed_json_and_escaping_paths(tmp_path):
    root = write_cirr(str(tmp_path / "c"))
    caption_file = os.path.join(root, "cirr", "captions", "cap.rc2.train.json")
    with open(caption_file) as f:
        lines = f.read().splitlines()
    lines[5] = lines[5] + ","  # a stray comma on line 6
    with open(caption_file, "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(datasets.DatasetFormatError, match=r"cap\.rc2\.train\.json:\d+: not valid"):
        datasets.CIRRDataset(root, "train", datasets.ClipImageTransform(32))
    split_file = os.path.join(root, "cirr", "image_splits", "split.rc2.val.json")
    _edit_json(split_file, lambda c: c.__setitem__("dev-0-0-img0", "../../etc/passwd"))
    with pytest.raises(
        datasets.DatasetFormatError,
        match=r"split\.rc2\.val\.json: entry "
        r"'dev-0-0-img0': refusing the image path",
    ):
        datasets.CIRRDataset(root, "val", datasets.ClipImageTransform(32))


def test_missing_image_is_skipped_and_counted_or_a_located_error(tmp_path):
    root = write_cirr(str(tmp_path / "c"))
    val = datasets.CIRRDataset(root, "val", datasets.ClipImageTransform(32))
    os.remove(val.image_path(3))
    with pytest.warns(datasets.BadImageWarning, match="image file missing"):
        grey = val.get_img(3)
    assert grey.shape == (3, 32, 32) and val.bad_image_count() == 1
    strict = datasets.CIRRDataset(root, "val", datasets.ClipImageTransform(32), on_bad_image="fail")
    with pytest.raises(
        datasets.BadImageError, match=r"dev/0/dev-3-0-img1\.png: image file missing"
    ):
        strict.get_img(3)


def test_circo_loader_and_bad_entries(tmp_path):
    root = write_circo(str(tmp_path / "circo"))
    t = datasets.ClipImageTransform(32)
    val, test = datasets.CIRCODataset(root, "val", t), datasets.CIRCODataset(root, "test", t)
    assert len(val.imgs) == 60 and len(val.queries) == 5 and len(test.queries) == 4
    assert all(q["gt"][0] == q["target"] for q in val.queries) and test.queries[0]["gt"] == []
    _edit_json(
        os.path.join(root, "annotations", "val.json"), lambda c: c[3]["gt_img_ids"].append(-7)
    )
    with pytest.raises(
        datasets.DatasetFormatError, match=r"val\.json: entry 3 \(id 3\): gt_img_ids member -7"
    ):
        datasets.CIRCODataset(root, "val", t)


# ----------------------------------------------------------------------------------- metrics


def _loop_rank(query, gallery, exclude):
    """Gallery indices by descending cosine similarity, ties by index, ``exclude`` left out."""
    q = query / np.linalg.norm(query)
    scores = [(-(float(q @ (g / np.linalg.norm(g)))), i) for i, g in enumerate(gallery)]
    return [i for _, i in sorted(scores) if i not in exclude]


def test_recall_and_recall_subset_against_loops():
    rng = np.random.default_rng(0)
    n_q, n_g = 30, 70
    gallery = rng.normal(size=(n_g, 8))
    gallery[5] = gallery[9]  # an exact tie
    query = rng.normal(size=(n_q, 8))
    query[0] = gallery[5]
    reference = rng.integers(0, n_g, n_q)
    members = [
        [int(x) for x in rng.choice(n_g, 5, replace=False) if x != reference[i]] for i in range(n_q)
    ]
    target = np.array([m[int(rng.integers(0, len(m)))] for m in members])
    top = clip4cir.ranked_gallery(torch.tensor(query), torch.tensor(gallery), reference, 50)
    subset = clip4cir.ranked_subset(torch.tensor(query), torch.tensor(gallery), members)
    metrics = clip4cir.cirr_metrics(top, subset, target)
    for i in range(n_q):
        full = _loop_rank(query[i], gallery, {int(reference[i])})
        assert top[i].tolist() == full[:50]
        assert [x for x in subset[i].tolist() if x >= 0] == [x for x in full if x in members[i]]
    for k in clip4cir.RECALL_KS:
        expected = np.mean(
            [
                int(target[i]) in _loop_rank(query[i], gallery, {int(reference[i])})[:k]
                for i in range(n_q)
            ]
        )
        assert metrics[f"R@{k}"] == pytest.approx(100 * expected)
    for k in clip4cir.SUBSET_KS:
        expected = np.mean(
            [
                int(target[i])
                in [x for x in _loop_rank(query[i], gallery, set()) if x in members[i]][:k]
                for i in range(n_q)
            ]
        )
        assert metrics[f"Rs@{k}"] == pytest.approx(100 * expected)
    assert metrics["M"] == pytest.approx((metrics["R@5"] + metrics["Rs@1"]) / 2)


def test_small_gallery_never_ranks_the_reference():
    g = torch.randn(6, 4)
    top = clip4cir.ranked_gallery(g[:3] + 0.01, g, [0, 1, 2], 50)
    assert top.shape == (3, 5) and all(r not in row for r, row in zip([0, 1, 2], top.tolist()))


def test_circo_map_against_loops():
    rng = np.random.default_rng(1)
    n_q, n_g = 25, 80
    top = torch.tensor(np.stack([rng.permutation(n_g)[:50] for _ in range(n_q)]))
    gt = [
        [int(x) for x in rng.choice(n_g, int(rng.integers(1, 12)), replace=False)]
        for _ in range(n_q)
    ]
    metrics = clip4cir.circo_map(top, gt)
    for k in clip4cir.CIRCO_KS:
        aps = []
        for row, g in zip(top.tolist(), gt):
            hits, total = 0, 0.0
            for rank, item in enumerate(row[:k], 1):
                if item in g:
                    hits += 1
                    total += hits / rank
            aps.append(total / min(len(g), k))
        assert metrics[f"mAP@{k}"] == pytest.approx(100 * np.mean(aps))


# ----------------------------------------------------------------------------------- submissions


def _check_cirr_schema(content, dataset, metric, n):
    """The CIRR server's format, checked independently of clip4cir.validate_submission."""
    assert content["version"] == "rc2" and content["metric"] == metric
    ids = {k for k in content if k not in ("version", "metric")}
    assert ids == {str(q["pairid"]) for q in dataset.queries}
    names = {im["name"] for im in dataset.imgs}
    for q in dataset.queries:
        ranked = content[str(q["pairid"])]
        assert isinstance(ranked, list) and len(ranked) == n and len(set(ranked)) == n
        assert all(isinstance(x, str) and x in names for x in ranked)
        assert dataset.imgs[q["reference"]]["name"] not in ranked


def _common(tmp_path, dataset, path):
    return [
        "--dataset",
        dataset,
        "--dataset_path",
        str(path),
        *TINY,
        "--loader_num_workers",
        "0",
        "--data_dir",
        str(tmp_path / "data"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--batch_size",
        "4",
        "--eval_batch_size",
        "16",
    ]


def test_submissions_written_validated_and_schema_checked(tmp_path):
    import main

    root = write_cirr(str(tmp_path / "c"))
    circo = write_circo(str(tmp_path / "circo"))
    out = tmp_path / "sub"
    cirr_result = main.main(
        [
            *_common(tmp_path, "cirr", root),
            "--model",
            "clip_sum",
            "--test_only",
            "--model_checkpoint",
            "untrained",
            "--write_submission",
            str(out),
            "--circo_path",
            circo,
        ]
    )  # a CIRR model also ranks CIRCO: its val mAP among the test metrics, its test file
    assert {"circo_mAP@10", "R@5", "M"} <= set(cirr_result["test"])
    assert (out / "circo_test_submission.json").is_file()
    test1 = datasets.CIRRDataset(root, "test1", datasets.ClipImageTransform(32))
    recall = json.loads((out / "cirr_test1_recall.json").read_text())
    subset = json.loads((out / "cirr_test1_recall_subset.json").read_text())
    _check_cirr_schema(recall, test1, "recall", len(test1.imgs) - 1)  # 11 < 50 images
    _check_cirr_schema(subset, test1, "recall_subset", 3)
    for q in test1.queries:
        members = {test1.imgs[m]["name"] for m in q["members"]}
        assert set(subset[str(q["pairid"])]) <= members
    # validation refuses what the server would
    for broken in (
        {k: v for k, v in recall.items() if k != str(test1.queries[0]["pairid"])},
        {
            **recall,
            str(test1.queries[0]["pairid"]): recall[str(test1.queries[1]["pairid"])][:1] * 11,
        },
        {**recall, "metric": "recall_subset"},
    ):
        with pytest.raises(ValueError):
            clip4cir.validate_submission(broken, test1, "recall")
    q = test1.queries[0]
    outsider = next(
        im["name"]
        for i, im in enumerate(test1.imgs)
        if i not in q["members"] and i != q["reference"]
    )
    wrong = {**subset, str(q["pairid"]): [*subset[str(q["pairid"])][:2], outsider]}
    with pytest.raises(ValueError, match="outside its img_set"):
        clip4cir.validate_submission(wrong, test1, "recall_subset")

    out2 = tmp_path / "sub2"
    result = main.main(
        [
            *_common(tmp_path, "circo", circo),
            "--model",
            "clip4cir",
            "--test_only",
            "--model_checkpoint",
            "untrained",
            "--write_submission",
            str(out2),
        ]
    )
    assert set(result["test"]) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "M"}
    content = json.loads((out2 / "circo_test_submission.json").read_text())
    test = datasets.CIRCODataset(circo, "test", datasets.ClipImageTransform(32))
    assert set(content) == {str(q["id"]) for q in test.queries}
    ids = {im["name"] for im in test.imgs}
    for q in test.queries:
        ranked = content[str(q["id"])]
        assert len(ranked) == 50 and len(set(ranked)) == 50 and set(ranked) <= ids
        assert test.imgs[q["reference"]]["name"] not in ranked


# ----------------------------------------------------------------------------------- end to end


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_stages_end_to_end(tmp_path):
    """Stage 1 (both encoders, element-wise sum, L_GA^A on pixels through attention) and stage
    2 (frozen encoders from stage 1's checkpoint, cached features, the Combiner) through
    main.main: metrics.jsonl, checkpoints, TensorBoard tags, the feature cache reused."""
    from tb_events import read_scalars

    import main

    root = write_cirr(str(tmp_path / "c"))
    common = [
        *_common(tmp_path, "cirr", root),
        "--num_iters",
        "2",
        "--eval_every",
        "2",
        "--learning_rate",
        "1e-4",
    ]
    main.main([*common, "--model", "clip_sum", "--ga", "--comment", "stage1"])
    (run1,) = (tmp_path / "logs").glob("*_stage1")
    records = _records(run1)
    assert [r["split"] for r in records] == ["train", "test"] and records[0]["synthetic"] is False
    keys = {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "M", "WHM"}
    assert keys <= set(records[1]) and {"infonce", "sim", "ga_adv", "ga_iso"} <= set(
        records[0]["loss"]
    )
    state = torch.load(run1 / "latest.pt", weights_only=True)
    assert state["iteration"] == 2 and state["args"]["clip_model"] == "clip_tiny"
    assert any(k.startswith("clip.visual.") for k in state["model"])
    tags = set(read_scalars(run1))
    assert {"train/infonce", "train/ga_adv", "eval/test/R5", "eval/test/Rs1", "eval/WHM"} <= tags

    stage2 = [
        *common,
        "--model",
        "clip4cir",
        "--clip_weights",
        str(run1 / "latest.pt"),
        "--ga",
        "--ga_adv_input",
        "features",
        "--comment",
        "stage2",
    ]
    result = main.main(stage2)
    (run2,) = (tmp_path / "logs").glob("*_stage2")
    cache = sorted(os.listdir(tmp_path / "data" / "clip_features"))
    assert [c.split("_")[1] for c in cache] == ["train", "val"]
    state2 = torch.load(run2 / "latest.pt", weights_only=True)
    assert any(k.startswith("combiner.") for k in state2["model"])
    for name, value in state["model"].items():  # stage 2 froze stage 1's CLIP
        if name.startswith("clip."):
            assert torch.equal(state2["model"][name], value), name
    assert {"train/infonce", "train/ga_adv", "eval/test/M"} <= set(read_scalars(run2))
    mtimes = [os.path.getmtime(tmp_path / "data" / "clip_features" / c) for c in cache]
    again = main.main([*stage2[:-1], "stage2b"])  # the cache is read, not rewritten
    assert [os.path.getmtime(tmp_path / "data" / "clip_features" / c) for c in cache] == mtimes
    assert again["test"] == pytest.approx(result["test"])
    # --test_only restores the Combiner and the CLIP from the checkpoint (the stage-1 file is
    # not read again) and gives the training run's last evaluation
    os.rename(run1 / "latest.pt", run1 / "moved.pt")
    evaluated = main.main(
        [
            *_common(tmp_path, "cirr", root),
            "--log_dir",
            str(tmp_path / "eval"),
            "--test_only",
            "--model_checkpoint",
            str(run2 / "latest.pt"),
        ]
    )
    assert evaluated["test"] == pytest.approx(result["test"])
    assert evaluated["train"] == pytest.approx(result["train"])


def test_synthetic_cirr_stand_in(tmp_path):
    path = datasets.generate_cirr_synthetic(str(tmp_path / "s"), seed=0, size=3)
    meta = json.loads(open(os.path.join(path, datasets.SYNTHETIC_MARKER)).read())
    assert meta["synthetic"] is True
    t = datasets.ClipImageTransform(32)
    splits = {s: datasets.CIRRDataset(path, s, t) for s in ("train", "val", "test1")}
    assert all(d.synthetic for d in splits.values())
    assert all(len(q["members"]) == 5 for q in splits["val"].queries)
    pairids = [q["pairid"] for d in splits.values() for q in d.queries]
    assert len(pairids) == len(set(pairids))
    assert "SYNTHETIC" in datasets.describe(splits["train"])


# ----------------------------------------------------------------------------------- GA on CLIP


def test_ga_adv_on_pixels_through_attention_matches_finite_differences(tmp_path):
    """d L_GA^A / d theta by double backward through the ViT's attention (math SDPA backend
    inside the term) equals central differences of L_GA^A, in float64."""
    import gradient_augmentation as ga
    import main

    root = write_cirr(str(tmp_path / "c"))
    args = main.parse_args(
        [
            *_common(tmp_path, "cirr", root),
            "--model",
            "clip_sum",
            "--ga_adv_eps",
            "0.5",
            "--ga_adv_q",
            "2",
        ]
    )
    trainset, _ = clip4cir.build_datasets(args)
    torch.manual_seed(0)
    model = clip4cir.build_model(args, trainset).double().train()
    batch = trainset.collate_fn([trainset[i] for i in range(3)])
    device = torch.device("cpu")

    def l_ga_adv():
        out = clip4cir.forward(model, batch, args, device)
        loss, _ = main.data_loss(out, args)
        x_grad = main.input_gradient(loss, out["adv_input"], create_graph=True)
        return ga.adversarial_gradient_augmentation(x_grad, args.ga_adv_eps, args.ga_adv_q)

    weight = model.clip.visual.transformer.resblocks[0].attn.in_proj_weight
    (grad,) = torch.autograd.grad(l_ga_adv(), weight)
    picks = [(0, 0), (70, 3), (150, 10)]  # query, key and value rows
    h = 1e-6
    for i, j in picks:
        with torch.no_grad():
            weight[i, j] += h
        up = l_ga_adv().item()
        with torch.no_grad():
            weight[i, j] -= 2 * h
        down = l_ga_adv().item()
        with torch.no_grad():
            weight[i, j] += h
        assert grad[i, j].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    assert grad.abs().sum() > 0


def test_stage_settings_refused_with_reasons(tmp_path):
    import main

    root = write_cirr(str(tmp_path / "c"))
    with pytest.raises(SystemExit):  # clip_sum has nothing to train on frozen encoders
        main.main(
            [
                *_common(tmp_path, "cirr", root),
                "--model",
                "clip_sum",
                "--clip_stage",
                "combiner",
                "--num_iters",
                "1",
            ]
        )
    with pytest.raises(SystemExit):
        main.main(
            [*_common(tmp_path, "cirr", root), "--model", "clip4cir", "--ga", "--num_iters", "1"]
        )
    with pytest.raises(SystemExit):  # CIRCO is for evaluation only
        main.main(
            [
                *_common(tmp_path, "circo", write_circo(str(tmp_path / "o"))),
                "--model",
                "clip4cir",
                "--num_iters",
                "1",
            ]
        )


def test_clip_models_on_main_composed_datasets(tmp_path):
    """--model clip_sum/clip4cir on fashioniq (and css3d) dispatch to clip4cir: trained end to
    end, evaluated with the dataset's own protocol (per-category R@10/R@50 for FashionIQ)."""
    from test_real_datasets import make_fashioniq

    import main

    root = make_fashioniq(tmp_path / "fiq")
    argv = [
        "--dataset",
        "fashioniq",
        "--dataset_path",
        root,
        *TINY,
        "--loader_num_workers",
        "0",
        "--log_dir",
        str(tmp_path / "logs"),
        "--batch_size",
        "4",
        "--num_iters",
        "2",
        "--eval_every",
        "2",
        "--image_size",
        "32",
    ]
    args = main.parse_args([*argv, "--model", "clip_sum"])
    assert main.task_of(args) is clip4cir and args.loss == "infonce"
    result = main.main([*argv, "--model", "clip4cir", "--clip_stage", "finetune"])
    assert {"R@10", "R@50", "M"} <= set(result["test"]) and "dress_R@10" in result["test"]
    with pytest.raises(SystemExit):  # the cached-feature stage is CIRR's
        main.main([*argv, "--model", "clip4cir"])
