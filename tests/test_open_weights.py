"""Open model files: safetensors + an architecture JSON, rebuilt with no unpickling; old trials still load."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from zoo import DECODER_FAMILIES, ZOO, tiny_decoder

from autoprune import model_files, weights_format
from autoprune.methods import PruneContext, get_method


class Config:
    """A plain object attribute (like a Hugging Face config): JSON cannot hold it."""

    def __init__(self, width: int) -> None:
        self.width = width


class WithConfig(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.config = Config(width)
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_with_config(width: int = 6) -> nn.Module:
    return WithConfig(width)


def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _structured(model: nn.Module) -> nn.Module:
    """The zoo ResNet pruned by Torch-Pruning (channels) with a block replaced by Identity."""
    model = ZOO["resnet"].build().eval()
    method = get_method("l1_structured")
    context = PruneContext(example_inputs=ZOO["resnet"].example(2), protected=frozenset({"fc"}))
    units = method.candidates(model, context)
    method.prune(model, {unit: 0.5 for unit in units[:3]}, context)
    return model


def test_structured_model_round_trips_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pruned = _structured(ZOO["resnet"].build())
    name = next(n for n, m in pruned.named_modules() if n and not isinstance(m, nn.Conv2d | nn.BatchNorm2d) and
                type(m).__name__ == "BasicBlock")
    parent, _, child = name.rpartition(".")
    setattr(pruned.get_submodule(parent) if parent else pruned, child, nn.Identity())  # a removed block
    files = model_files.save_model(pruned, tmp_path)
    arch = json.loads(files.skeleton_path.read_text())
    assert arch["fallback"] is None
    records = {r["name"]: r for r in arch["modules"]}
    assert records[name]["class"] == "torch.nn.modules.linear:Identity"
    conv = next(n for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d))
    assert records[conv]["attrs"]["out_channels"] == pruned.get_submodule(conv).out_channels
    x = ZOO["resnet"].example(3)
    _no_unpickling(monkeypatch)
    reloaded = model_files.load_model(tmp_path, model_files.file_digests(tmp_path))
    templated = model_files.load_model(tmp_path, factory=ZOO["resnet"].build)  # the dense model, resized
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x)) and torch.equal(templated(x), pruned(x))
    assert files.total_bytes == files.weights_bytes + files.skeleton_bytes
    assert files.weights_bytes == files.weights_path.stat().st_size


def test_safetensors_file_is_plain_safetensors_with_bitmask(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(128, 256) < 0.9] = 0.0
    files = model_files.save_model(model, tmp_path)
    with safe_open(files.weights_path, "pt") as f:
        entries = json.loads(f.metadata()["entries"])
        assert f.metadata()["format"] == weights_format.WEIGHTS_FORMAT
        assert "sparse" in entries["0.weight"] and "dense" in entries["1.weight"]
        assert f.get_tensor("0.weight:mask").dtype == torch.uint8
        assert f.get_tensor("0.weight:values").numel() == int((model[0].weight != 0).sum())
    assert files.weights_bytes < 0.3 * 256 * 128 * 4
    reloaded = model_files.load_model(tmp_path)
    assert torch.equal(reloaded[0].weight, model[0].weight)


def test_tied_weights_and_non_persistent_buffers(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    model.register_buffer("scale", torch.tensor(2.0), persistent=False)
    model_files.save_model(model, tmp_path)
    reloaded = model_files.load_model(tmp_path)
    assert reloaded[1].weight is reloaded[0].weight
    assert reloaded.scale.item() == 2.0 and "scale" not in reloaded.state_dict()


def test_opaque_attributes_use_the_factory_or_fall_back(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.model_io import build_model

    x = torch.randn(2, 4)
    built = build_model(make_with_config, {"width": 6}, "model.factory")  # remembers its factory
    model_files.save_model(built, tmp_path / "factory")
    arch = json.loads((tmp_path / "factory" / model_files.SKELETON_FILE).read_text())
    assert arch["fallback"] is None and arch["factory"]["spec"].endswith(":make_with_config")
    with monkeypatch.context() as patch:
        _no_unpickling(patch)
        reloaded = model_files.load_model(tmp_path / "factory")
    assert isinstance(reloaded.config, Config)
    with torch.no_grad():
        assert torch.equal(reloaded(x), built(x))

    given = WithConfig()  # a model object: no factory known
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        model_files.save_model(given, tmp_path / "object")
    assert "pickled skeleton" in caplog.text
    arch = json.loads((tmp_path / "object" / model_files.SKELETON_FILE).read_text())
    assert "config" in arch["fallback"]["reason"]
    with torch.no_grad():
        assert torch.equal(model_files.load_model(tmp_path / "object")(x), given(x))
        assert torch.equal(model_files.load_model(tmp_path / "object", factory=WithConfig)(x), given(x))


def test_old_format_trial_still_loads(tmp_path: Path) -> None:
    """A trial written by the previous format's writer (kept as a private function) loads, digests checked."""
    pruned = _structured(ZOO["resnet"].build())
    old = model_files._save_model_legacy(pruned, tmp_path)
    assert old.weights_path.name == "weights.pt" and old.skeleton_path.name == "skeleton.pt"
    assert model_files.has_model_files(tmp_path)
    expected = {"weights.pt": model_files.file_digests(tmp_path)["weights.pt"],
                "skeleton.pt": model_files.file_digests(tmp_path)["skeleton.pt"]}
    reloaded = model_files.load_model(tmp_path, expected)
    x = ZOO["resnet"].example(2)
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_layer_removed_decoder_reloads_with_its_own_config(family: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder built by a factory, a layer removed: reloaded from its files (from the factory, nothing
    unpickled) it has the pruned model's ``num_hidden_layers`` / ``layer_types`` and cache indices, not the
    factory's, and greedy generation with the KV cache gives the same tokens."""
    pytest.importorskip("transformers")
    from autoprune.model_io import build_model

    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    pruned = build_model(tiny_decoder, {"family": family}, "model.factory")  # remembers its factory
    context = PruneContext(example_inputs=ids, protected=frozenset({"lm_head"}))
    get_method("remove_block").prune(pruned, {"model.layers.1": 1.0}, context)  # the middle of 3
    assert pruned.config.num_hidden_layers == 2
    files = model_files.save_model(pruned, tmp_path)
    arch = json.loads(files.skeleton_path.read_text())
    assert arch["fallback"] is None and len(arch["configs"]) == 1  # one config, shared by the modules
    assert arch["configs"][0]["attrs"]["num_hidden_layers"] == 2 and ["", "config"] in arch["configs"][0]["held_by"]
    with monkeypatch.context() as patch:
        _no_unpickling(patch)
        reloaded = model_files.load_model(tmp_path, model_files.file_digests(tmp_path))
    templated = model_files.load_model(tmp_path, factory=lambda: tiny_decoder(family))  # a template given
    for model in (reloaded, templated):
        assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
        assert getattr(model.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
        assert model.config is model.model.config is model.model.layers[1].self_attn.config  # still one object
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
        expected = pruned.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(reloaded.config.layer_types) == 2
    assert tiny_decoder(family).config.num_hidden_layers == 3  # the factory's own models are untouched
