"""ESA task benchmarks; prints one JSON object.

(a) Evaluation at the COCO 5K shape (5,000 images x 25,000 captions, 1,024-d): ours
    (``test_retrieval.image_text_recall``: chunked fp32 ``q @ g.T`` on the features' device,
    ranks counted) against a re-creation of ESA's lib/evaluation.py as its eval.py runs it:
    float64 embeddings (``encode_data`` fills ``np.zeros`` arrays), ``compute_sim`` with
    ``np.matmul``, then ``i2t`` (per image: ``np.argsort`` of its 25,000 scores and ``np.where``
    for each of its 5 captions) and ``t2i`` (per caption: ``np.argsort`` of 5,000 scores). The
    recalls must be equal.
(b) One training step at batch 128 on the real feature shape (36 x 2,048), a 10k vocabulary:
    our encoders + SEL (``esa.forward``, backward, clip 2, AdamW) against a plain-torch
    re-creation of ESA's EncoderImageAggr / EncoderText / ContrastiveLoss step (written from
    reading the code, not copied). ESA noises captions in its loader workers; that is left out
    of its time, while ours includes the (vectorised) noise.

    nice python benchmarks/bench_esa.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import datasets  # noqa: E402
import esa  # noqa: E402
import test_retrieval  # noqa: E402

# ------------------------------------------------------------------------- (a) evaluation


def esa_i2t(npts, sims):
    """ESA's i2t (mode 'coco'), re-created: per image a full argsort and a search per caption."""
    ranks = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    return tuple(100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))


def esa_t2i(npts, sims):
    """ESA's t2i (mode 'coco'), re-created: per caption a full argsort over the images."""
    ranks = np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return tuple(100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))


def bench_eval(n_images, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    noise = torch.randn(5 * n_images, dim, generator=g)
    noise = noise * (9.0 / dim**0.5)  # cosine ~0.11 to their image: mid-range recalls at 5K
    captions = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + noise, dim=1)

    t0 = time.perf_counter()
    ours = test_retrieval.image_text_recall(images, captions, 5)
    t_ours = time.perf_counter() - t0

    img64, cap64 = images.double().numpy(), captions.double().numpy()
    t0 = time.perf_counter()
    sims = np.matmul(img64, cap64.T)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = esa_i2t(n_images, sims)
    ri = esa_t2i(n_images, sims)
    t_loops = time.perf_counter() - t0
    theirs = dict(zip(["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"], r + ri))
    theirs["rsum"] = sum(r + ri)
    equal = all(abs(ours[k] - theirs[k]) < 1e-9 for k in theirs)
    return {
        "shape": f"{n_images} images x {5 * n_images} captions x {dim}-d",
        "ours_s": round(t_ours, 3),
        "esa_s": round(t_sim + t_loops, 3),
        "esa_matmul_s": round(t_sim, 3),
        "esa_loops_s": round(t_loops, 3),
        "speedup": round((t_sim + t_loops) / t_ours, 1),
        "recalls_equal": equal,
        "ours": {k: round(v, 4) for k, v in ours.items()},
        "esa": {k: round(v, 4) for k, v in theirs.items()},
    }


# ------------------------------------------------------------------------- (b) training step


class EsaReImage(nn.Module):
    """ESA's EncoderImageAggr (precomp_enc_type 'basic'), re-created in plain torch."""

    def __init__(self, img_dim, embed):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed)
        self.l1, self.bn1 = nn.Linear(img_dim, embed // 2), nn.BatchNorm1d(embed // 2)
        self.l2 = nn.Linear(embed // 2, embed)
        self.linear1 = nn.Linear(embed, embed)

    def forward(self, image):
        b, n, d = image.shape
        hidden = torch.relu(self.bn1(self.l1(image.reshape(b * n, d))))
        features = self.fc(image) + self.l2(hidden).view(b, n, -1)
        external = self.linear1(features)
        outs = []
        for _ in range(2):  # two region masks, each handled separately as in ESA
            mask = (torch.rand(b, n) >= 0.2).unsqueeze(-1)
            filled = external.masked_fill(mask == 0, -10000)
            soft = torch.softmax(filled - filled.max(dim=1)[0].unsqueeze(1), dim=1)
            attn = soft.masked_fill(mask == 0, 0)
            outs.append(torch.sum(attn * features, dim=1))
        x = torch.cat([o.unsqueeze(1) for o in outs], 1).reshape(-1, features.size(-1))
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


class EsaReText(nn.Module):
    """ESA's EncoderText (BiGRU), re-created: sort by length, pack, GRU, unsort, average the
    directions, masked max-subtracted softmax attention per dimension."""

    def __init__(self, vocab, word_dim, embed):
        super().__init__()
        self.embed = nn.Embedding(vocab, word_dim)
        self.rnn = nn.GRU(word_dim, embed, 1, batch_first=True, bidirectional=True)
        self.linear1 = nn.Linear(embed, embed)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, lengths):
        x_emb = self.dropout(self.embed(x))
        lengths = lengths.clamp(min=1)
        sorted_lengths, indices = torch.sort(lengths, descending=True)
        _, unsort = torch.sort(indices)
        packed = nn.utils.rnn.pack_padded_sequence(x_emb[indices], sorted_lengths, batch_first=True)
        out, _ = self.rnn(packed)
        cap, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        cap = cap[unsort]
        cap = (cap[:, :, : cap.size(2) // 2] + cap[:, :, cap.size(2) // 2 :]) / 2
        max_len = int(lengths.max())
        mask = (torch.arange(max_len).expand(len(lengths), max_len) < lengths[:, None]).unsqueeze(
            -1
        )
        cap = cap[:, :max_len]
        external = self.linear1(cap).masked_fill(mask == 0, -10000)
        attn = torch.softmax(external - external.max(dim=1)[0].unsqueeze(1), dim=1)
        attn = attn.masked_fill(mask == 0, 0)
        x = torch.sum(attn * cap, dim=1)
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def esa_re_loss(im, s, hardnum=2, margin=0.2):
    """ESA's ContrastiveLoss with max_violation, re-created (block mask, masked_select)."""
    scores = im.mm(s.t())
    mm_a = (torch.arange(scores.size(0)) // hardnum + 1) * hardnum
    mask_a = torch.arange(im.size(0)).view(im.size(0), 1).expand_as(scores)
    mask1 = mask_a < mm_a.long()
    mask = mask1 * mask1.t()
    inner = torch.masked_select(scores, mask).reshape(scores.size(0) // hardnum, hardnum, hardnum)
    pos_img = inner.min(dim=2)[0].reshape((-1, 1))
    cost_s = (margin + scores - pos_img.view(im.size(0), 1).expand_as(scores)).clamp(min=0)
    pos_cap = inner.min(dim=1)[0].reshape((1, -1))
    cost_im = (margin + scores - pos_cap.view(1, s.size(0)).expand_as(scores)).clamp(min=0)
    cost_s = cost_s.masked_fill(mask, 0)
    cost_im = cost_im.masked_fill(mask, 0)
    return cost_im.max(0)[0].sum() + cost_s.max(1)[0].sum()


def bench_step(batch_size, regions, img_dim, vocab_size, steps, seed=0):
    torch.manual_seed(seed)
    words = [f"w{i}" for i in range(vocab_size - 5)]
    vocab = datasets.CaptionVocab(words)
    lengths = torch.randint(10, 20, (batch_size,))
    tokens = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, :n] = torch.randint(5, vocab_size, (n,))
    batch = {
        "regions": torch.rand(batch_size, regions, img_dim),
        "tokens": tokens,
        "lengths": lengths,
        "epoch": 2.0,
    }
    args = argparse.Namespace(
        loss="sel", views=2, region_drop=0.2, token_noise=0.2, margin=0.2, warmup_epochs=1
    )

    class _Train:
        feature_dim = img_dim
        captions = [""] * 10000

    _Train.vocab = vocab
    model_args = argparse.Namespace(
        text_encoder="gru", embed_size=1024, img_pool="attention", txt_pool="attention",
        word_dim=300, word_vectors=None, batch_size=batch_size, learning_rate=5e-4,
        weight_decay=1e-2, lr_update_epochs=15,
    )  # fmt: skip
    ours = esa.build_model(model_args, _Train()).train()
    opt, _ = esa.build_optimizer(model_args, ours)

    def our_step():
        out = esa.forward(ours, batch, args, torch.device("cpu"))
        opt.zero_grad(set_to_none=True)
        out["losses"]["sel"].backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 2.0)
        opt.step()

    img, txt = EsaReImage(img_dim, 1024), EsaReText(vocab_size, 300, 1024)
    params = list(txt.parameters()) + list(img.parameters())
    esa_opt = torch.optim.AdamW(params, lr=5e-4)
    # ESA's loader hands over (B, 2, T) noised captions; two noised copies made outside the step
    noised, noised_len = ours.txt_enc.noised_views(tokens, lengths, 2, 0.2)

    def esa_step():
        im = img(batch["regions"])
        s = txt(noised, noised_len)
        esa_opt.zero_grad()
        loss = esa_re_loss(im, s)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        esa_opt.step()

    variants = {"ours": our_step, "esa": esa_step}
    samples = {name: [] for name in variants}
    for step in variants.values():
        step()  # warm-up
    for _ in range(steps):  # interleaved, so the machine's drift hits both alike
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "shape": f"batch {batch_size}, {regions} x {img_dim} regions, vocab {vocab_size}, "
        f"embed 1024, 2 views",
        "ours_s_per_step": round(times["ours"], 3),
        "esa_s_per_step": round(times["esa"], 3),
        "ratio_ours_over_esa": round(times["ours"] / times["esa"], 3),
        "steps_timed": steps,
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    a = p.parse_args(argv)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if a.quick:
        result["eval"] = bench_eval(500, 256)
        result["train_step"] = bench_step(16, 36, 256, 1000, 2)
    else:
        result["eval"] = bench_eval(5000, 1024)
        result["train_step"] = bench_step(128, 36, 2048, 10000, 8)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
