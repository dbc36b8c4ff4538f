"""Text encoders: TIRG's word vocabulary and LSTM.

Every encoder is a ``torch.nn.Module`` with an ``out_dim`` attribute whose ``forward(texts)`` takes
a list of B strings and returns a (B, out_dim) float tensor on the module's device.
"""

from __future__ import annotations

import re
import string

import torch

_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


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
        outputs, _ = self.lstm(embedded)  # (T, B, H); padding after a text cannot affect it
        last = outputs[lengths.to(device) - 1, torch.arange(len(texts), device=device)]
        return self.fc_output(last)
