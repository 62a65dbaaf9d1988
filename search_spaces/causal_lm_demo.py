"""Factories for pruning a small Llama-architecture language model trained here, on real English text.

No pretrained causal LM ships inside an installed package (the package lists hold none), so the search
trains one once (``model.pretrain``; the weights are kept in the work dir as ``dense.pt``):

* **Corpus**: the Python Language Reference as shipped in CPython's own standard library
  (``pydoc_data.topics``: 79 topics, about 465,000 characters of English prose with some grammar and code
  examples; the text ``help()`` prints, the same as the reference part of the Python documentation).
  It is on every machine that runs Python (Debian's ``python3-doc`` is not installed here, and nothing
  needs downloading). The topics are split by name: every 5th topic (sorted) is held out, alternately for
  validation (about 32,000 characters: what the search selects on) and test (about 36,000: what the front is
  reported on), so neither is text the model trained on, and the test text is not what trials were chosen by.
* **Tokenizer**: bytes (vocabulary 256), so no tokenizer file is needed.
* **Model**: :class:`ByteLM`, a ``transformers`` ``LlamaForCausalLM`` built from a config (random
  initialisation, no download): 4 decoder layers, hidden size 96, 4 query heads of 24 sharing 2
  key/value heads (grouped-query attention), SwiGLU MLP of 256, untied ``lm_head``; about 0.46M
  parameters. ``ByteLM.forward(input_ids)`` returns the logits, so autoprune can time, count and export it.

``model.task: causal_lm`` gives the loss (shifted next-token cross-entropy) and the objective
(validation perplexity, minimized). Needs the transformers extra: ``pip install 'autoprune[transformers]'``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

INSTALL_HINT = "pip install 'autoprune[transformers]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"the causal-LM search needs the transformers extra: {INSTALL_HINT} ({exc})") from None
    return transformers


class ByteLM(nn.Module):
    """A Llama decoder over bytes: ``input_ids [B, L]`` -> logits ``[B, L, 256]`` (no KV cache in the forward
    pass, which is what the trials time). ``lm.generate`` works as for any ``LlamaForCausalLM``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def make_model(hidden: int = 96, layers: int = 4, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 256, context: int = 256) -> ByteLM:
    """A randomly initialised :class:`ByteLM` (the search pre-trains it once; see the module docstring)."""
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return ByteLM(transformers.LlamaForCausalLM(config)).eval()


def corpus(held_out_every: int = 5) -> tuple[str, str, str]:
    """(training, validation, test text): the Python Language Reference topics; every ``held_out_every``-th
    (by sorted name, from the first) is held out, the held-out ones alternately for validation and test."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [name for index, name in enumerate(names) if index % held_out_every == 0]
    val, test = set(held[0::2]), set(held[1::2])
    train = "\n\n".join(topics[name] for name in names if name not in val | test)
    return (train, "\n\n".join(topics[name] for name in names if name in val),
            "\n\n".join(topics[name] for name in names if name in test))


def encode(text: str, length: int) -> torch.Tensor:
    """Byte ids ``[N, length]``: the UTF-8 bytes cut into consecutive windows (the remainder dropped)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    count = data.numel() // length
    return data[: count * length].reshape(count, length)


def make_loaders(batch_size: int = 16, length: int = 128, seed: int = 0, train_windows: int | None = None,
                 val_windows: int | None = None, held_out_every: int = 5
                 ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, validation, test) loaders of ``input_ids [B, length]`` alone (``model.task: causal_lm`` uses the
    ids as labels; the search selects on validation and reports the front on test). ``train_windows`` keeps a
    seeded random subset of the training windows (an epoch of pre-training is then ``train_windows /
    batch_size`` steps); ``val_windows`` the first validation and test windows."""
    texts = corpus(held_out_every)
    train, val, test = (encode(text, length) for text in texts)
    if train_windows is not None:
        order = list(range(train.shape[0]))
        random.Random(seed).shuffle(order)
        train = train[order[:train_windows]]
    if val_windows is not None:
        val, test = val[:val_windows], test[:val_windows]
    return (DataLoader(TensorDataset(train), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(TensorDataset(val), batch_size=batch_size),
            DataLoader(TensorDataset(test), batch_size=batch_size))


def sample(model: ByteLM, prompt: str, new_bytes: int = 80) -> str:
    """Greedy continuation of ``prompt`` with the KV cache (``generate``), decoded as UTF-8."""
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)
    out = model.lm.generate(ids, max_new_tokens=new_bytes, do_sample=False, pad_token_id=0)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")
