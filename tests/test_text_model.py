import pytest
import torch

import text_model


def test_vocab_tokenizes_and_maps_unknown_words_to_zero():
    vocab = text_model.SimpleVocab()
    vocab.add_text_to_vocab("Make the Circle, small!")
    assert vocab.get_size() == 5  # <UNK> + 4 words
    ids = vocab.encode_text("make the SQUARE small")
    assert ids[0] == vocab.word2id["make"] and ids[2] == 0 and ids[3] == vocab.word2id["small"]
    with pytest.raises(ValueError, match="empty"):
        vocab.encode_text(" ,. ")


def test_lstm_batch_equals_one_text_at_a_time():
    torch.manual_seed(0)
    texts = ["add red circle", "remove it", "make the small blue square large", "x"]
    model = text_model.TextLSTMModel(texts, word_embed_dim=8, lstm_hidden_dim=6).eval()
    batch = model(texts)
    assert batch.shape == (4, 6) and model.out_dim == 6
    for i, text in enumerate(texts):  # padding must not change any text's feature
        torch.testing.assert_close(model([text])[0], batch[i], atol=1e-6, rtol=1e-5)


def test_lstm_vocabulary_travels_in_the_state_dict():
    model = text_model.TextLSTMModel(["a b c"], 4, 4)
    other = text_model.TextLSTMModel(["c b a"], 4, 4)
    other.load_state_dict(model.state_dict())
    assert other.vocab.words == model.vocab.words
    torch.testing.assert_close(other.eval()(["a c"]), model.eval()(["a c"]))
    bigger = text_model.TextLSTMModel(["a b c d"], 4, 4)
    with pytest.raises((RuntimeError, ValueError), match="vocabulary|size"):
        bigger.load_state_dict(model.state_dict())
