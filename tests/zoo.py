"""Tiny architectures that cover the layer patterns pruning methods must handle.

Each :class:`ZooEntry` builds a small, seeded model that runs in milliseconds on
a CPU: a residual CNN with a downsampling shortcut, a DenseNet-style concat, a
MobileNetV2-style depthwise inverted residual, a stock ``nn.TransformerEncoder``
classifier, an MLP with ``BatchNorm1d`` and a tiny Hugging Face-style transformer
(separate q/k/v/o projections). ``head`` names the classifier, which callers
put in ``PruneContext.protected``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class TinyDenseNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.block = nn.Sequential(DenseLayer(8, 6), DenseLayer(14, 6))
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1, bias=False))
        self.norm = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(self.block(self.stem(x)))
        x = torch.relu(self.norm(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        )
        self.features = nn.Sequential(InvertedResidual(8, 8, 1, 3), InvertedResidual(8, 12, 2, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class TinyTransformer(nn.Module):
    """A stock ``nn.TransformerEncoder`` (batch_first) on float token features."""

    def __init__(self, num_classes: int = 5, features: int = 8, d_model: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class BNMLP(nn.Module):
    def __init__(self, num_classes: int = 4, features: int = 20) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 24),
            nn.BatchNorm1d(24),
            nn.ReLU(),
        )
        self.out = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class HFStyleAttention(nn.Module):
    """Hugging Face-style self-attention: separate q/k/v projections, ``o_proj``,
    and ``num_heads`` / ``head_dim`` attributes read in ``forward``."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, num_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, num_heads * self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)


class HFStyleMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HFStyleLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.self_attn = HFStyleAttention(hidden, num_heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = HFStyleMLP(hidden, intermediate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.ln1(hidden_states))
        return hidden_states + self.mlp(self.ln2(hidden_states))


class TinyHFModel(nn.Module):
    """Token ids in, class logits out; two pre-norm layers of :class:`HFStyleLayer`."""

    def __init__(self, num_classes: int = 3, vocab: int = 50, hidden: int = 16) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(HFStyleLayer(hidden, 4, 32) for _ in range(2))
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class ZooEntry:
    """One architecture: ``factory()`` builds the model, ``inputs(batch, generator)``
    draws a batch of inputs, ``head`` is the protected classifier."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    num_classes: int
    head: str

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory()

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return self.inputs(batch, torch.Generator().manual_seed(seed))

    def batches(
        self, count: int = 2, batch: int = 4, seed: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Labelled random batches (calibration data for gradient-based scores)."""
        gen = torch.Generator().manual_seed(seed)
        return [
            (self.inputs(batch, gen), torch.randint(0, self.num_classes, (batch,), generator=gen))
            for _ in range(count)
        ]


def _images(batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=gen)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("resnet", TinyResNet, _images, 10, "fc"),
        ZooEntry("densenet", TinyDenseNet, _images, 10, "classifier"),
        ZooEntry("mobilenet", TinyMobileNet, _images, 10, "classifier"),
        ZooEntry("transformer", TinyTransformer, lambda b, g: torch.randn(b, 6, 8, generator=g), 5, "head"),
        ZooEntry("mlp", BNMLP, lambda b, g: torch.randn(b, 20, generator=g), 4, "out"),
        ZooEntry("hf", TinyHFModel, lambda b, g: torch.randint(0, 50, (b, 6), generator=g), 3, "classifier"),
    )
}


def fine_tune(model: nn.Module, entry: ZooEntry, steps: int = 8) -> list[float]:
    """A few Adam steps on one fixed batch: the losses, to check a pruned model still trains."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, labels = entry.batches(count=1, batch=8, seed=3)[0]
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


#: Tiny Hugging Face decoder LMs (random weights, built from their configs; nothing is downloaded).
DECODER_FAMILIES = ("llama", "mistral", "qwen2")


def tiny_decoder(family: str = "llama", seed: int = 0, layers: int = 3) -> nn.Module:
    """A tiny ``<Family>ForCausalLM``: hidden 64, 8 query heads of 8 sharing 4 key/value heads (grouped-query
    attention, 2 queries per key/value head), SwiGLU MLP of 128, vocabulary 128, untied ``lm_head``
    (Qwen2 adds q/k/v biases). Eager attention, so masked and shrunk outputs compare exactly."""
    import transformers

    transformers.logging.set_verbosity_error()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_class(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                          num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
                          tie_word_embeddings=False, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).eval()


class Logits(nn.Module):
    """A Hugging Face causal LM behind ``ids -> logits``, the way a search takes one (what trials time and export)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits
