"""ESA: External Space attention Aggregation for image-text retrieval (Zhu et al., TCSVT 2023).

Image <-> caption retrieval on precomputed bottom-up region features (Flickr30K, MS-COCO), as a
task module of main.py (see TASKS in main.py): flags, defaults, datasets, model, optimizer,
one training forward and the evaluation.

    python main.py --dataset f30k_precomp --dataset_path data/f30k --model esa --loss sel
    python main.py --dataset coco_precomp --dataset_path data/coco --text_encoder hf --ga
    python main.py --dataset f30k_precomp                      # the synthetic stand-in
    python main.py --dataset f30k_precomp --test_only --ensemble runA/best.pt runB/best.pt

Model (ESA's lib/encoders.py):
- image: ``fc(x) + MLP(x)`` per region (MLP: Linear(D, E/2), BatchNorm, ReLU, Linear(E/2, E)),
  then the external space attention: ``a = softmax_regions(Linear_E(h))`` separately for every
  dimension, ``f = sum_r a_r * h_r``, then L2 normalisation;
- text ``gru``: word embedding (300-d), dropout 0.1, a BiGRU whose two directions are averaged,
  the same attention over the tokens (padding masked), L2 normalisation;
- text ``hf``: token states of the offline transformer, Linear(H, E), dropout 0.1, the same
  attention; the transformer frozen unless ``--finetune_text_layers N``.

Loss (ESA's lib/loss.py): the self-expanding loss ``sel`` over V=2 region-drop views of each
image and V=2 noised views of each caption; the V x V block of an (image, caption) pair are its
positives and the hardest (lowest-scoring) positive is used, with margin 0.2; negatives summed in
the first ``--warmup_epochs`` epochs and only the hardest (VSE++) afterwards; both directions.
``vsepp`` is VSE++'s hardest-negative triplet loss on one view.
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch
from torch import nn

import datasets
import test_retrieval

#: Names main's shared flags must accept for this task (main owns --dataset, --model, --loss
#: and --text_encoder; add_arguments adds only the flags that are new).
DATASET_NAMES = tuple(datasets.PRECOMP_SPLITS)  # f30k_precomp, coco_precomp
MODEL_NAMES = ("esa",)
LOSS_NAMES = ("sel", "vsepp")
TEXT_ENCODER_NAMES = ("gru", "hf")
POOLS = ("attention", "mean")

#: ESA's recipe (sh/train_GRU_*.sh): AdamW, lr 5e-4 x 0.1 after epoch 15, 25 epochs, batch 128,
#: gradient clipping 2. num_iters follows from the epochs: ``num_iters_for(args, trainset)``.
#: weight_decay 0.01 is torch's AdamW default, which ESA's BiGRU code uses.
DEFAULTS: dict[str, object] = {
    "model": "esa",
    "loss": "sel",
    "text_encoder": "gru",
    "learning_rate": 5e-4,
    "batch_size": 128,
    "weight_decay": 1e-2,
    "grad_clip": 2.0,
}

TRAIN_SAMPLE_SEED = 0  # the fixed sample of training images that measures M_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ESA (image-text matching)")
    g.add_argument("--embed_size", type=int, default=1024, help="joint embedding size")
    g.add_argument("--word_dim", type=int, default=300, help="gru: word embedding size")
    g.add_argument(
        "--word_vectors",
        default=None,
        help="gru: a local GloVe text file ('word v_1 ... v_word_dim' per line) to initialise "
        "the word embeddings (ESA uses GloVe 840B 300-d); None: random",
    )
    g.add_argument(
        "--vocab_min_count",
        type=int,
        default=4,
        help="gru: training-caption words seen fewer times map to <unk> (SCAN's threshold)",
    )
    g.add_argument(
        "--finetune_text_layers",
        type=int,
        default=0,
        help="hf: train the last N transformer layers (at 0.1x the learning rate, as ESA's "
        "BERT); 0 keeps it frozen",
    )
    g.add_argument("--img_pool", default="attention", choices=POOLS, help="region aggregation")
    g.add_argument("--txt_pool", default="attention", choices=POOLS, help="token aggregation")
    g.add_argument("--margin", type=float, default=0.2, help="triplet margin (sel, vsepp)")
    g.add_argument(
        "--warmup_epochs",
        type=float,
        default=1,
        help="epochs with the sum over negatives before the hardest negative (VSE++)",
    )
    g.add_argument("--views", type=int, default=2, help="sel: views per image and caption")
    g.add_argument(
        "--region_drop", type=float, default=0.2, help="sel: share of regions masked per view"
    )
    g.add_argument(
        "--token_noise",
        type=float,
        default=0.2,
        help="sel: share of tokens noised per view (half <mask>, a tenth a random word, the "
        "rest deleted)",
    )
    g.add_argument("--num_epochs", type=int, default=25, help="num_iters follows from it")
    g.add_argument(
        "--lr_update_epochs", type=float, default=15, help="the learning rate x 0.1 from here"
    )
    g.add_argument(
        "--eval_split",
        default="test",
        choices=["test", "dev"],
        help="what M_t is measured on: the test protocol (F30K test 1K; COCO testall: 5-fold "
        "1K and 5K), or dev for model selection",
    )
    g.add_argument(
        "--ensemble",
        nargs=2,
        default=None,
        metavar=("CKPT_A", "CKPT_B"),
        help="with --test_only: ESA*, the average of two models' similarity matrices",
    )


# ----------------------------------------------------------------------------------- data


def _synthetic_size(args):
    size = getattr(args, "synthetic_size", "full")
    return size if size in datasets.PRECOMP_SYNTHETIC_SIZES else int(size)


def resolve_dataset_path(args) -> str:
    """--dataset_path, or the synthetic stand-in (generated on first use)."""
    if args.dataset_path is not None:
        return args.dataset_path
    return datasets.precomp_synthetic_dir(
        getattr(args, "data_dir", "./data"), args.dataset, args.seed, _synthetic_size(args)
    )


def build_datasets(args):
    """(train, test) PrecompDatasets of args.dataset; without --dataset_path the synthetic
    stand-in, generated under <data_dir>/<name>_synthetic_seed<seed>/ on first use."""
    name = args.dataset
    path = resolve_dataset_path(args)
    split = datasets.PRECOMP_TEST_SPLIT[name] if args.eval_split == "test" else "dev"
    loaded = datasets.load_precomp(
        name, path, [split], seed=args.seed, vocab_min_count=args.vocab_min_count
    )
    return loaded["train"], loaded[split]


def num_iters_for(args, trainset, world_size: int = 1) -> int:
    """Iterations of args.num_epochs epochs (ESA drops the last incomplete batch)."""
    per_epoch = max(1, len(trainset.captions) // (args.batch_size * world_size))
    return args.num_epochs * per_epoch


# ----------------------------------------------------------------------------------- model


def l2norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / (||x|| + eps) along the last dimension (ESA's l2norm)."""
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + eps)


def _xavier_(linear: nn.Linear) -> nn.Linear:
    """ESA's init_weights: U(-r, r), r = sqrt(6 / (fan_in + fan_out)); zero bias."""
    r = math.sqrt(6.0) / math.sqrt(linear.in_features + linear.out_features)
    nn.init.uniform_(linear.weight, -r, r)
    nn.init.zeros_(linear.bias)
    return linear


class ExternalSpaceAttention(nn.Module):
    """ESA's aggregation: per-dimension attention over a set.

    ``forward(h (..., T, E), keep (..., T) bool) -> (..., E)``:
    ``a = softmax over the kept T of Linear(h)`` for every one of the E dimensions separately,
    and the output is ``sum_t a_t * h_t``. ``pool="mean"``: the mean of the kept items (the
    baseline). Every row must keep at least one item.
    """

    def __init__(self, embed_size: int, pool: str = "attention"):
        super().__init__()
        self.pool = pool
        self.linear = _xavier_(nn.Linear(embed_size, embed_size)) if pool == "attention" else None

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep.unsqueeze(-1)
        if self.pool == "mean":
            weights = keep.to(h.dtype)
            return (h * weights).sum(-2) / weights.sum(-2)
        logits = self.linear(h).float().masked_fill(~keep, float("-inf"))
        attention = torch.softmax(logits, dim=-2)
        return (attention * h.float()).sum(-2)


class RegionEncoder(nn.Module):
    """Regions (B, R, D) -> embeddings (B, E) or (B, V, E) with V region-drop views."""

    def __init__(self, img_dim: int, embed_size: int, pool: str = "attention"):
        super().__init__()
        self.fc = _xavier_(nn.Linear(img_dim, embed_size))
        # ESA's MLP(img_dim, embed_size // 2, embed_size, 2): the batch norm of its last layer
        # is built but never applied, so it is left out here.
        self.mlp = nn.Sequential(
            nn.Linear(img_dim, embed_size // 2),
            nn.BatchNorm1d(embed_size // 2),
            nn.ReLU(),
            nn.Linear(embed_size // 2, embed_size),
        )
        self.aggregate = ExternalSpaceAttention(embed_size, pool)

    def region_embeddings(self, regions: torch.Tensor) -> torch.Tensor:
        b, r, d = regions.shape
        residual = self.mlp(regions.reshape(b * r, d)).reshape(b, r, -1)
        return self.fc(regions) + residual

    def forward(self, regions: torch.Tensor, views: int = 0, drop: float = 0.0) -> torch.Tensor:
        h = self.region_embeddings(regions)
        b, r, _ = h.shape
        if views == 0:
            keep = torch.ones(b, r, dtype=torch.bool, device=h.device)
            return l2norm(self.aggregate(h, keep))
        keep = torch.rand(b, views, r, device=h.device) >= drop
        keep |= ~keep.any(-1, keepdim=True)  # a view that dropped every region keeps them all
        return l2norm(self.aggregate(h.unsqueeze(1), keep))  # (B, V, E)


def noise_tokens(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    p: float,
    mask_id: int,
    random_ids: tuple[int, int],
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESA's caption noise, vectorised: each token is noised with probability p; a noised token
    becomes ``mask_id`` (half of them), a random id in ``[random_ids[0], random_ids[1])`` (a
    tenth), or is deleted (the rest). tokens (N, T) right-padded with 0, lengths (N,);
    ``protect`` (N, T) bool marks tokens never noised. Returns (tokens, lengths), right-padded.
    A row that would lose every token keeps its first. Randomness: torch's global RNG."""
    n, t = tokens.shape
    positions = torch.arange(t, device=tokens.device)
    valid = positions < lengths[:, None]
    u = torch.rand(n, t, device=tokens.device)
    noised = valid & (u < p)
    if protect is not None:
        noised &= ~protect
    v = u / p if p > 0 else u
    replace_mask = noised & (v < 0.5)
    replace_random = noised & (v >= 0.5) & (v < 0.6)
    delete = noised & (v >= 0.6)
    random_words = torch.randint(random_ids[0], random_ids[1], (n, t), device=tokens.device)
    out = torch.where(replace_mask, torch.full_like(tokens, mask_id), tokens)
    out = torch.where(replace_random, random_words, out)
    keep = valid & ~delete
    keep[:, 0] |= ~keep.any(1)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept tokens first
    new_lengths = keep.sum(1)
    out = out.gather(1, order).masked_fill(positions >= new_lengths[:, None], 0)
    return out[:, : int(new_lengths.max())], new_lengths


class GRUTextEncoder(nn.Module):
    """Word ids (N, T), lengths (N,) -> embeddings (N, E): ESA's EncoderText with a BiGRU."""

    def __init__(self, vocab, word_dim: int, embed_size: int, pool: str = "attention"):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(len(vocab), word_dim)
        self.dropout = nn.Dropout(0.1)
        self.rnn = nn.GRU(word_dim, embed_size, 1, batch_first=True, bidirectional=True)
        self.aggregate = ExternalSpaceAttention(embed_size, pool)

    def get_extra_state(self):
        return {"vocab": list(self.vocab.words)}

    def set_extra_state(self, state):
        if state.get("vocab") != list(self.vocab.words):
            raise ValueError(
                "the checkpoint's vocabulary differs from the one built from this run's training "
                "captions (another dataset, or another --vocab_min_count)"
            )

    def noised_views(self, tokens, lengths, views: int, p: float):
        tokens, lengths = tokens.repeat_interleave(views, 0), lengths.repeat_interleave(views, 0)
        if p <= 0:
            return tokens, lengths
        v = self.vocab
        return noise_tokens(tokens, lengths, p, v.mask_id, (v.n_special, len(v)))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(tokens))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        half = out.shape[-1] // 2
        h = (out[..., :half] + out[..., half:]) / 2
        keep = torch.arange(h.shape[1], device=h.device) < lengths.to(h.device)[:, None]
        return l2norm(self.aggregate(h, keep))


class HFTokenTextEncoder(nn.Module):
    """Captions -> embeddings (N, E) from the token states of an offline transformer
    (ESA_BERT's EncoderText: Linear(H, E), dropout 0.1, the attention). The transformer is a
    copy of text_model's offline all-MiniLM-L6-v2 (or --text_model); frozen unless
    ``finetune_layers`` > 0, which trains its last layers."""

    def __init__(self, embed_size, pool="attention", model_name=None, finetune_layers=0):
        super().__init__()
        import text_model

        model_dir = text_model.resolve_model_dir(model_name or text_model.default_hf_model_path())
        tokenizer, shared = text_model.load_transformer(model_dir)
        self.tokenizer = tokenizer
        self.transformer = copy.deepcopy(shared).train()
        self.transformer.requires_grad_(False)
        layers = self._layers()
        self.finetune_layers = min(finetune_layers, len(layers))
        for layer in layers[len(layers) - self.finetune_layers :]:
            layer.requires_grad_(True)
        hidden = self.transformer.config.hidden_size
        self.linear = _xavier_(nn.Linear(hidden, embed_size))
        self.dropout = nn.Dropout(0.1)
        self.aggregate = ExternalSpaceAttention(embed_size, pool)
        self.max_length = 64

    def _layers(self):
        encoder = getattr(self.transformer, "encoder", None)
        return list(getattr(encoder, "layer", []))

    def tokenize(self, captions: list[str], device):
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(device)
        return ids, batch["attention_mask"].sum(1).to(device)

    def noised_views(self, tokens, lengths, views: int, p: float):
        tokens, lengths = tokens.repeat_interleave(views, 0), lengths.repeat_interleave(views, 0)
        if p <= 0:
            return tokens, lengths
        special = torch.tensor(self.tokenizer.all_special_ids, device=tokens.device)
        protect = torch.isin(tokens, special)
        return noise_tokens(
            tokens, lengths, p, self.tokenizer.mask_token_id, (0, len(self.tokenizer)), protect
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        if self.finetune_layers == 0:
            self.transformer.eval()
            with torch.no_grad():
                states = self.transformer(input_ids=tokens, attention_mask=mask.long())
        else:
            states = self.transformer(input_ids=tokens, attention_mask=mask.long())
        h = self.dropout(self.linear(states.last_hidden_state.float()))
        return l2norm(self.aggregate(h, mask))


class ESAModel(nn.Module):
    """The image and text encoders; ``n_train_captions`` feeds the epoch-based schedule."""

    def __init__(self, img_encoder, txt_encoder, text_kind: str, n_train_captions: int):
        super().__init__()
        self.img_enc = img_encoder
        self.txt_enc = txt_encoder
        self.text_kind = text_kind
        self.n_train_captions = n_train_captions

    def caption_inputs(self, batch: dict, device):
        """(tokens (N, T), lengths (N,)) of a collated batch for this model's text encoder."""
        if self.text_kind == "hf":
            return self.txt_enc.tokenize(batch["captions"], device)
        return batch["tokens"].to(device), batch["lengths"].to(device)

    def encode_captions_from_texts(self, captions: list[str], device) -> torch.Tensor:
        if self.text_kind == "hf":
            return self.txt_enc(*self.txt_enc.tokenize(captions, device))
        items = [{"tokens": self.txt_enc.vocab.encode(c)} for c in captions]
        lengths = torch.tensor([len(it["tokens"]) for it in items])
        tokens = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
        for row, it in enumerate(items):
            tokens[row, : len(it["tokens"])] = torch.tensor(it["tokens"])
        return self.txt_enc(tokens.to(device), lengths.to(device))


def build_model(args, trainset) -> ESAModel:
    text_kind = args.text_encoder or "gru"
    if text_kind not in TEXT_ENCODER_NAMES:
        raise ValueError(f"--model esa takes --text_encoder gru or hf, not {text_kind}")
    img = RegionEncoder(trainset.feature_dim, args.embed_size, args.img_pool)
    if text_kind == "gru":
        txt = GRUTextEncoder(trainset.vocab, args.word_dim, args.embed_size, args.txt_pool)
        if args.word_vectors:
            vectors, found = datasets.load_word_vectors(
                args.word_vectors, trainset.vocab, args.word_dim
            )
            with torch.no_grad():
                txt.embed.weight[found] = vectors[found]
            print(f"word vectors: {int(found.sum())}/{len(found)} words from {args.word_vectors}")
    else:
        txt = HFTokenTextEncoder(
            args.embed_size,
            args.txt_pool,
            getattr(args, "text_model", None),
            args.finetune_text_layers,
        )
    return ESAModel(img, txt, text_kind, len(trainset.captions))


def build_optimizer(args, model: ESAModel):
    """AdamW (ESA); a fine-tuned transformer at 0.1x the learning rate (ESA_BERT); the rate
    x 0.1 once ``iteration * batch / n_train_captions`` reaches ``--lr_update_epochs`` (main
    steps the scheduler once per iteration)."""
    transformer = getattr(model.txt_enc, "transformer", None)
    slow = {id(p) for p in transformer.parameters()} if transformer is not None else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in slow], "lr": args.learning_rate}]
    slow_params = [p for p in params if id(p) in slow]
    if slow_params:
        groups.append({"params": slow_params, "lr": args.learning_rate * 0.1})
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    samples_per_iteration = args.batch_size * getattr(args, "world_size", 1)
    n = model.n_train_captions

    def factor(iteration: int) -> float:
        return 0.1 if iteration * samples_per_iteration / n >= args.lr_update_epochs else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------- losses


def self_expanding_loss(
    image_views: torch.Tensor,
    caption_views: torch.Tensor,
    views: int,
    margin: float = 0.2,
    hardest_negative: bool = True,
) -> torch.Tensor:
    """SEL (ESA's ContrastiveLoss with hardnum = views), a scalar.

    image_views, caption_views: (B * V, E), the V views of item b in rows b*V .. b*V+V-1. With
    S = image_views @ caption_views.T, the positives of row i (an image view of item b) are the
    V caption views of b, and its positive score is the lowest of them: p_i = min_j S[i, j];
    likewise a caption view's is the lowest over b's image views. Every other entry is a
    negative, with hinge costs

        c_s[i, j] = [margin + S[i, j] - p_i]_+      (caption retrieval, per image view)
        c_im[i, j] = [margin + S[i, j] - p'_j]_+    (image retrieval, per caption view)

    summed over all negatives, or (hardest_negative, VSE++) over the highest-cost negative of
    each row of c_s and each column of c_im. Summed, not averaged, as ESA's code does.
    """
    scores = image_views @ caption_views.T
    n = scores.shape[0]
    b = n // views
    item = torch.arange(n, device=scores.device) // views
    positive = item[:, None] == item[None, :]
    inner = scores.view(b, views, b, views).diagonal(dim1=0, dim2=2)  # (V, V, B)
    row_positive = inner.amin(dim=1).T.reshape(n)  # per image view: min over caption views
    col_positive = inner.amin(dim=0).T.reshape(n)  # per caption view: min over image views
    cost_s = (margin + scores - row_positive[:, None]).clamp(min=0).masked_fill(positive, 0)
    cost_im = (margin + scores - col_positive[None, :]).clamp(min=0).masked_fill(positive, 0)
    if hardest_negative:
        return cost_s.amax(dim=1).sum() + cost_im.amax(dim=0).sum()
    return cost_s.sum() + cost_im.sum()


def vsepp_loss(images, captions, margin: float = 0.2, hardest_negative: bool = True):
    """VSE++'s triplet loss on (B, E) pairs (row i matches row i): SEL with one view."""
    return self_expanding_loss(images, captions, 1, margin, hardest_negative)


# ----------------------------------------------------------------------------------- training


def forward(model: ESAModel, batch: dict, args, device, adv_input=None) -> dict:
    """One training forward (see the contract). ``batch["epoch"]`` (captions seen / training
    captions, from the sampler's indices) decides the warm-up: the sum over negatives for
    ``--warmup_epochs``, then the hardest negative."""
    regions = batch["regions"].to(device) if adv_input is None else adv_input
    adversarial = (getattr(args, "ga_adv_eps", 0) or 0) > 0 or (
        getattr(args, "fgsm_eps", 0) or 0
    ) > 0
    if adv_input is None and adversarial:
        regions = regions.detach().requires_grad_(True)
    sel = args.loss == "sel"
    views = args.views if sel else 1
    tokens, lengths = model.caption_inputs(batch, device)
    if sel:
        image_views = model.img_enc(regions, views, args.region_drop)  # (B, V, E)
        tokens, lengths = model.txt_enc.noised_views(tokens, lengths, views, args.token_noise)
    else:
        image_views = model.img_enc(regions).unsqueeze(1)
    caption_views = model.txt_enc(tokens, lengths)  # (B * V, E)
    b, _, e = image_views.shape
    image_views = image_views.reshape(b * views, e).float()
    caption_views = caption_views.float()
    hardest = float(batch["epoch"]) >= args.warmup_epochs
    loss = self_expanding_loss(image_views, caption_views, views, args.margin, hardest)
    # L_S over every positive (image view, caption view) pair of each item
    a = image_views.view(b, views, 1, e).expand(b, views, views, e).reshape(-1, e)
    c = caption_views.view(b, 1, views, e).expand(b, views, views, e).reshape(-1, e)
    return {"losses": {args.loss: loss}, "sim": (a, c), "adv_input": regions}


# ----------------------------------------------------------------------------------- evaluation


def encode_split(model: ESAModel, dataset, image_ids, caption_ids, device, batch_size=256):
    """L2-normalised (len(image_ids), E) image and (len(caption_ids), E) caption features, each
    image and caption encoded once (model in eval mode, under no_grad: main's job)."""
    image_ids, caption_ids = list(image_ids), list(caption_ids)
    images = []
    for start in datasets.progress(
        range(0, len(image_ids), batch_size), desc="encode images", leave=False
    ):
        regions = dataset.region_features(image_ids[start : start + batch_size]).to(device)
        images.append(model.img_enc(regions).float())
    captions = []
    texts = [dataset.captions[i] for i in caption_ids]
    for start in datasets.progress(
        range(0, len(texts), batch_size), desc="encode captions", leave=False
    ):
        captions.append(
            model.encode_captions_from_texts(texts[start : start + batch_size], device).float()
        )
    return torch.cat(images), torch.cat(captions)


def _with_m(metrics: dict) -> dict:
    metrics["M"] = metrics["rsum"] / 6
    return metrics


def training_sample(trainset, max_captions: int):
    """Fixed sample of whole training images (fixed seed, without replacement) with all their
    captions, at most max_captions captions: (image ids, caption ids)."""
    per = trainset.captions_per_image
    n = min(trainset.n_images, max(1, max_captions // per))
    rng = np.random.default_rng(TRAIN_SAMPLE_SEED)
    image_ids = np.sort(rng.choice(trainset.n_images, n, replace=False))
    caption_ids = (image_ids[:, None] * per + np.arange(per)).reshape(-1)
    return image_ids.tolist(), caption_ids.tolist()


def _test_metrics(score_fn, n_images, testset) -> dict:
    """Recalls on the test split: COCO testall gets 5-fold 1K (unprefixed, M) and 5K
    (``5K_`` prefix); every other split one gallery."""
    per = testset.captions_per_image
    n_captions = n_images * per
    if testset.split == "testall" and n_images % 5 == 0:
        metrics = _with_m(
            test_retrieval.image_text_recall_folds(
                scores=score_fn, n_images=n_images, captions_per_image=per
            )
        )
        full = test_retrieval.image_text_recall_from_scores(
            score_fn, per, n_images=n_images, n_captions=n_captions
        )
        metrics.update({f"5K_{k}": v for k, v in full.items()})
        return metrics
    return _with_m(
        test_retrieval.image_text_recall_from_scores(
            score_fn, per, n_images=n_images, n_captions=n_captions
        )
    )


def _feature_scores(pairs):
    """score_fn(rows, cols) averaging ``img[rows] @ cap[cols].T`` over (img, cap) pairs."""

    def score_fn(rows, cols):
        total = None
        for images, captions in pairs:
            block = images[rows] @ captions[cols].T
            total = block if total is None else total + block
        return total / len(pairs)

    return score_fn


def evaluate(model, trainset, testset, args, device) -> dict:
    """{"train": M_s metrics, "test": M_t metrics}: i2t/t2i R@1/5/10 and rsum in percent, M =
    rsum / 6. train: the fixed sample of ``training_sample``; test: see ``_test_metrics``.

    ``model`` may be a list of models (in eval mode, under no_grad): ESA*, the average of their
    similarity matrices, formed block by block, never whole. Each model encodes each split once.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    batch_size = getattr(args, "eval_batch_size", 256)
    image_ids, caption_ids = training_sample(trainset, args.train_eval_queries)
    pairs = [encode_split(m, trainset, image_ids, caption_ids, device, batch_size) for m in models]
    train = _with_m(
        test_retrieval.image_text_recall_from_scores(
            _feature_scores(pairs), trainset.captions_per_image,
            n_images=len(image_ids), n_captions=len(caption_ids),
        )
    )  # fmt: skip
    all_images, all_captions = range(testset.n_images), range(len(testset.captions))
    pairs = [encode_split(m, testset, all_images, all_captions, device, batch_size) for m in models]
    test = _test_metrics(_feature_scores(pairs), testset.n_images, testset)
    return {"train": train, "test": test}
