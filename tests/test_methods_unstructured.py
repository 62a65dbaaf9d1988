"""Unstructured methods: which weights go, masks that survive fine-tuning, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from zoo import ZOO

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.methods import PruneContext, get_method
from autoprune.methods.unstructured import apply_masks, hold_masks, masks_of

torch.set_num_threads(1)
MLP = ZOO["mlp"]


def _context(**kwargs) -> PruneContext:
    defaults = {
        "example_inputs": MLP.example(2),
        "calibration_batches": MLP.batches(),
        "protected": frozenset({MLP.head}),
    }
    return PruneContext(**{**defaults, **kwargs})


def _zero_positions(module: nn.Module) -> set[int]:
    return set(torch.nonzero(module.weight.detach().flatten() == 0).flatten().tolist())


def test_l1_zeroes_exactly_the_smallest_magnitudes() -> None:
    model = MLP.build(seed=3)
    weight = model.body[0].weight.detach().clone()
    get_method("l1_unstructured").prune(model, {"body.0": 0.3}, _context())
    count = round(0.3 * weight.numel())
    assert _zero_positions(model.body[0]) == set(torch.argsort(weight.abs().flatten())[:count].tolist())
    untouched = model.body[0].weight.detach() != 0
    assert torch.equal(model.body[0].weight.detach()[untouched], weight[untouched])
    assert int((model.body[3].weight == 0).sum()) == 0  # other layers untouched


def test_l2_masks_equal_l1_masks_within_a_layer() -> None:
    a, b = MLP.build(seed=4), MLP.build(seed=4)
    get_method("l1_unstructured").prune(a, {"body.0": 0.6, "body.3": 0.2}, _context())
    get_method("l2_unstructured").prune(b, {"body.0": 0.6, "body.3": 0.2}, _context())
    assert torch.equal(masks_of(a)["body.0"], masks_of(b)["body.0"])
    assert torch.equal(masks_of(a)["body.3"], masks_of(b)["body.3"])


def test_random_is_reproducible_under_manual_seed() -> None:
    masks = []
    for seed in (11, 11, 12):
        model = MLP.build(seed=0)
        torch.manual_seed(seed)
        get_method("random_unstructured").prune(model, {"body.0": 0.5}, _context())
        masks.append(masks_of(model)["body.0"])
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    assert int((~masks[0]).sum()) == round(0.5 * masks[0].numel())


def test_taylor_scores_weight_times_gradient_per_batch() -> None:
    model = MLP.build(seed=5)
    context = _context()
    reference = copy.deepcopy(model).eval()
    saliency = torch.zeros_like(reference.body[0].weight)
    for inputs, labels in context.calibration_batches:
        reference.zero_grad()
        nn.functional.cross_entropy(reference(inputs), labels).backward()
        saliency += (reference.body[0].weight * reference.body[0].weight.grad).abs()
    model.train()
    get_method("taylor_unstructured").prune(model, {"body.0": 0.4}, context)
    count = round(0.4 * saliency.numel())
    assert _zero_positions(model.body[0]) == set(torch.argsort(saliency.flatten())[:count].tolist())
    assert model.training and model.body[1].training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    # BatchNorm statistics were not updated by the calibration passes
    assert torch.equal(model.body[1].running_mean, reference.body[1].running_mean)


def test_taylor_without_calibration_batches_raises() -> None:
    model = MLP.build()
    with pytest.raises(AutopruneError, match="calibration"):
        get_method("taylor_unstructured").prune(model, {"body.0": 0.5}, _context(calibration_batches=()))


def test_existing_zeros_count_towards_the_ratio() -> None:
    model = MLP.build(seed=6)
    with torch.no_grad():
        model.body[0].weight.view(-1)[:64] = 0
    torch.manual_seed(0)
    get_method("random_unstructured").prune(model, {"body.0": 0.5}, _context())
    assert int((model.body[0].weight == 0).sum()) == round(0.5 * model.body[0].weight.numel())
    assert set(range(64)) <= _zero_positions(model.body[0])


def test_torch_prune_reparametrization_is_folded_away() -> None:
    model = MLP.build(seed=7)
    torch_prune.l1_unstructured(model.body[0], "weight", amount=0.2)
    get_method("l1_unstructured").prune(model, {"body.0": 0.5}, _context())
    layer = model.body[0]
    assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
    assert isinstance(layer.weight, nn.Parameter) and not layer._forward_pre_hooks
    assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2


def test_masks_hold_zeros_through_fine_tuning() -> None:
    model = MLP.build(seed=8)
    get_method("l1_unstructured").prune(model, {"body.0": 0.7, "body.3": 0.5}, _context())
    masks = masks_of(model)
    assert set(masks) == {"body.0", "body.3"}
    zeros = {name: int((~mask).sum()) for name, mask in masks.items()}

    def fine_tune(net: nn.Module, keep: bool) -> None:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        handle = hold_masks(optimizer, net, masks) if keep else None
        for inputs, labels in MLP.batches(count=3, batch=8, seed=9):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
        if handle is not None:
            handle.remove()

    unmasked = copy.deepcopy(model)
    fine_tune(unmasked, keep=False)
    assert int((unmasked.body[0].weight == 0).sum()) < zeros["body.0"]  # training revives zeros
    fine_tune(model, keep=True)
    for name, count in zeros.items():
        assert int((model.get_submodule(name).weight == 0).sum()) == count
    apply_masks(unmasked, masks)  # the explicit form gives the same zero pattern
    assert masks_of(unmasked)["body.0"].equal(masks["body.0"])


def test_apply_masks_rejects_a_mask_of_another_shape() -> None:
    model = MLP.build()
    with pytest.raises(AutopruneError, match=r"body\.0"):
        apply_masks(model, {"body.0": torch.ones(3, 3, dtype=torch.bool)})


def test_protected_head_is_not_a_candidate() -> None:
    model = MLP.build()
    method = get_method("l1_unstructured")
    assert "out" not in method.candidates(model, _context())
    with pytest.raises(UnsupportedLayerError, match=r"space\.exclude"):
        method.prune(model, {"out": 0.5}, _context())
    with pytest.raises(UnsupportedLayerError, match=r"body\.1"):  # a BatchNorm is no unstructured unit
        method.prune(model, {"body.1": 0.5}, _context())
