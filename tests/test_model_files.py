"""Tests for autoprune.model_files."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoprune.model_files import (
    FORMAT,
    ModelFiles,
    load_model,
    load_weights,
    model_size_bytes,
    save_model,
    save_weights,
)


def _sparse_tensor(shape: tuple[int, ...], zero_fraction: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) < zero_fraction] = 0.0
    return t


def test_ninety_percent_zero_tensor_file_is_small_and_exact(tmp_path: Path) -> None:
    w = _sparse_tensor((512, 256), 0.9)
    w[0, 0] = -0.0  # stored as a zero (torch.nn.utils.prune produces -0.0 for negative weights)
    w[0, 1] = float("nan")
    w[0, 2] = 1e-30
    sparse_bytes = save_weights({"w": w}, tmp_path / "sparse.pt")
    torch.save({"w": w}, tmp_path / "dense.pt")
    dense_bytes = (tmp_path / "dense.pt").stat().st_size
    assert sparse_bytes == (tmp_path / "sparse.pt").stat().st_size
    assert sparse_bytes < 0.25 * dense_bytes
    back = load_weights(tmp_path / "sparse.pt")["w"]
    assert back.dtype == w.dtype and back.shape == w.shape
    nan = w.isnan()
    assert torch.equal(back.isnan(), nan)
    assert torch.equal(back[~nan], w[~nan])
    assert back[0, 0].item() == 0.0 and back[0, 2] == w[0, 2] != 0
    raw = torch.load(tmp_path / "sparse.pt", weights_only=True)
    assert raw["format"] == FORMAT
    entry = raw["tensors"]["w"]
    assert set(entry) == {"shape", "dtype", "mask", "values"}
    assert entry["mask"].dtype == torch.uint8 and entry["mask"].numel() == 512 * 256 // 8


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(7, 5),
        torch.randn(3, 4).to(torch.float16),
        torch.randn(3, 4).to(torch.bfloat16),
        torch.randn(3, 4, dtype=torch.float64),
        torch.arange(-5, 6),
        torch.tensor(3),  # 0-d, e.g. BatchNorm's num_batches_tracked
        torch.zeros(0, 4),
        torch.tensor([True, False, True]),
    ],
    ids=["f32", "f16", "bf16", "f64", "int64", "scalar", "empty", "bool"],
)
def test_dense_tensors_round_trip(tmp_path: Path, tensor: torch.Tensor) -> None:
    save_weights({"t": tensor}, tmp_path / "w.pt")
    back = load_weights(tmp_path / "w.pt")["t"]
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)
    assert isinstance(torch.load(tmp_path / "w.pt", weights_only=True)["tensors"]["t"], torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, torch.int64, torch.bool])
def test_sparse_round_trip_dtypes_and_odd_sizes(tmp_path: Path, dtype: torch.dtype) -> None:
    t = (_sparse_tensor((37, 61), 0.95, seed=1) * 10).to(dtype)  # 2257 elements: not a multiple of 8
    save_weights({"t": t}, tmp_path / "w.pt")
    entry = torch.load(tmp_path / "w.pt", weights_only=True)["tensors"]["t"]
    assert isinstance(entry, dict)
    back = load_weights(tmp_path / "w.pt")["t"]
    assert back.dtype == dtype and torch.equal(back, t)


def test_view_does_not_store_base_storage(tmp_path: Path) -> None:
    base = torch.randn(1000, 100)
    view = base[:10]
    n_view = save_weights({"t": view}, tmp_path / "v.pt")
    n_copy = save_weights({"t": view.clone()}, tmp_path / "c.pt")
    assert n_view == n_copy


def test_tied_tensors_stored_once(tmp_path: Path) -> None:
    w = torch.randn(256, 256)
    one = save_weights({"a": w}, tmp_path / "one.pt")
    two = save_weights({"a": w, "b": w}, tmp_path / "two.pt")
    assert two < one + 1024
    back = load_weights(tmp_path / "two.pt")
    assert back["a"] is back["b"] and torch.equal(back["a"], w)


def test_non_tensor_entry_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_weights({"x": 3}, tmp_path / "w.pt")  # type: ignore[dict-item]


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x) * self.scale


def _shrunk(model: SmallNet, keep: int) -> SmallNet:
    """Structured pruning by hand: conv1 keeps ``keep`` output channels, the block becomes Identity."""
    pruned = copy.deepcopy(model)
    idx = torch.arange(keep)
    conv1 = nn.Conv2d(1, keep, 3, padding=1)
    bn1 = nn.BatchNorm2d(keep)
    conv2 = nn.Conv2d(keep, 16, 3, padding=1)
    with torch.no_grad():
        conv1.weight.copy_(model.conv1.weight[idx])
        conv1.bias.copy_(model.conv1.bias[idx])
        for name in ("weight", "bias"):
            getattr(bn1, name).copy_(getattr(model.bn1, name)[idx])
        for name in ("running_mean", "running_var"):
            getattr(bn1, name).copy_(getattr(model.bn1, name)[idx])
        bn1.num_batches_tracked.copy_(model.bn1.num_batches_tracked)
        conv2.weight.copy_(model.conv2.weight[:, idx])
        conv2.bias.copy_(model.conv2.bias)
    pruned.conv1, pruned.bn1, pruned.conv2 = conv1, bn1, conv2
    pruned.block = nn.Identity()
    return pruned.eval()


def _trained_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    for _ in range(3):  # move BatchNorm running stats away from their defaults
        net(torch.randn(16, 1, 8, 8))
    return net.eval()


def test_save_load_model_structurally_pruned(tmp_path: Path) -> None:
    net = _trained_net()
    pruned = _shrunk(net, keep=4)
    x = torch.randn(5, 1, 8, 8)
    files = save_model(pruned, tmp_path / "m")
    assert isinstance(files, ModelFiles)
    assert files.weights_path.stat().st_size == files.weights_bytes
    assert files.skeleton_path.stat().st_size == files.skeleton_bytes
    assert files.total_bytes == files.weights_bytes + files.skeleton_bytes
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert isinstance(loaded.block, nn.Identity)
    assert loaded.conv1.out_channels == 4 and loaded.conv2.weight.shape == (16, 4, 3, 3)
    assert loaded.scale.item() == 0.5  # non-persistent buffer kept in the skeleton
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    for name, t in pruned.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # the smaller model makes smaller files
    assert files.total_bytes < model_size_bytes(net)


def test_save_model_does_not_mutate_and_skeleton_has_no_data(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    files = save_model(net, tmp_path)
    assert net.training and all(p.device.type == "cpu" for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert files.skeleton_bytes < 10_000 < files.weights_bytes  # ~1 MB of weights live only in weights.pt


def test_unstructured_zeros_shrink_model_size(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    dense_bytes = model_size_bytes(net)
    for layer in (net[0], net[2]):
        prune.l1_unstructured(layer, "weight", amount=0.9)
    with pytest.raises(ValueError, match=r"prune\.remove"):
        save_model(net, tmp_path / "masked")
    for layer in (net[0], net[2]):
        prune.remove(layer, "weight")
    assert model_size_bytes(net) < 0.35 * dense_bytes
    save_model(net, tmp_path / "m")
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(x), net(x))


def test_tied_parameters_stay_tied(tmp_path: Path) -> None:
    a = nn.Linear(8, 8, bias=False)
    b = nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    save_model(nn.Sequential(a, b), tmp_path)
    loaded = load_model(tmp_path)
    assert loaded[0].weight is loaded[1].weight
    assert torch.equal(loaded[0].weight, a.weight)


def test_quantized_tensors_round_trip_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    w[:, :24] = 0  # 75 % zeros: the int8 integers are stored sparsely
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_tensor = torch.quantize_per_tensor(w, 0.02, 0, torch.qint8)
        per_channel = torch.quantize_per_channel(w, torch.rand(64) / 10 + 0.01, torch.zeros(64, dtype=torch.long),
                                                 0, torch.qint8)
    save_weights({"t": per_tensor, "c": per_channel}, tmp_path / "q.pt")
    back = load_weights(tmp_path / "q.pt")
    for name, original in (("t", per_tensor), ("c", per_channel)):
        assert back[name].qscheme() == original.qscheme() and back[name].dtype == torch.qint8
        assert torch.equal(back[name].int_repr(), original.int_repr())
        assert torch.equal(back[name].dequantize(), original.dequantize())
    blob = torch.load(tmp_path / "q.pt", weights_only=True)
    assert blob["version"] == 2 and isinstance(blob["tensors"]["t"]["int_repr"], dict)


class _Planted:
    """A pickle that creates ``marker`` when it is loaded: code run by unpickling a planted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_digests_guard_the_skeleton_before_it_is_unpickled(tmp_path: Path) -> None:
    from autoprune.errors import AutopruneError
    from autoprune.model_files import SKELETON_FILE, WEIGHTS_FILE, digests, file_digests

    net = nn.Sequential(nn.Linear(4, 3))
    save_model(net, tmp_path / "m")
    expected = file_digests(tmp_path / "m")
    weights, skeleton = ((tmp_path / "m" / name).read_bytes() for name in (WEIGHTS_FILE, SKELETON_FILE))
    assert expected == digests(weights, skeleton) and set(expected) == {WEIGHTS_FILE, SKELETON_FILE}
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m", expected)(x), net(x))
    with pytest.raises(AutopruneError, match="stores no digest for it"):
        load_model(tmp_path / "m", {})

    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), tmp_path / "m" / SKELETON_FILE)
    with pytest.raises(AutopruneError, match=rf"{SKELETON_FILE}: sha256 .* expected .*refusing to load it") as info:
        load_model(tmp_path / "m", expected)
    assert "\n" not in str(info.value)
    assert not marker.exists()  # refused before reading
    with pytest.raises(AutopruneError, match=r"cannot read the architecture"):
        load_model(tmp_path / "m")  # unchecked: the open format never unpickles what it reads
    assert not marker.exists()


def test_digests_guard_a_legacy_skeleton_before_it_is_unpickled(tmp_path: Path) -> None:
    from autoprune.errors import AutopruneError
    from autoprune.model_files import LEGACY_SKELETON_FILE, LEGACY_WEIGHTS_FILE, _save_model_legacy, file_digests

    _save_model_legacy(nn.Sequential(nn.Linear(4, 3)), tmp_path / "m")
    expected = file_digests(tmp_path / "m")
    assert set(expected) == {LEGACY_WEIGHTS_FILE, LEGACY_SKELETON_FILE}
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), tmp_path / "m" / LEGACY_SKELETON_FILE)
    with pytest.raises(AutopruneError, match=r"skeleton.pt: sha256 .* expected .*refusing to load it"):
        load_model(tmp_path / "m", expected)
    assert not marker.exists()  # refused before unpickling
    with pytest.raises(AutopruneError, match=r"expected a pickled torch\.nn\.Module"):
        load_model(tmp_path / "m")  # unchecked: what the digests prevent
    assert marker.exists()


def test_missing_and_truncated_files_are_one_line_errors(tmp_path: Path) -> None:
    from autoprune.errors import AutopruneError
    from autoprune.model_files import SKELETON_FILE, WEIGHTS_FILE

    save_model(nn.Sequential(nn.Linear(64, 64)), tmp_path)
    weights = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(AutopruneError, match=rf"{WEIGHTS_FILE}: cannot read the weights \(damaged or truncated\?\)"
                       ) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / SKELETON_FILE).unlink()
    with pytest.raises(AutopruneError, match=rf"{SKELETON_FILE} is missing"):
        load_model(tmp_path)
