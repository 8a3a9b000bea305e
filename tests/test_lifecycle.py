"""The Method contract, checked for every registered method on every tiny task model it supports:
inject -> perturb -> forward/backward -> save -> load into a fresh base -> same outputs -> merge -> same outputs."""
from __future__ import annotations

import pytest
import torch

from peftcli.methods import METHODS
from peftcli.models.heads import in_head, trained_head
from peftcli.models.loading import auto_class

from method_configs import lifecycle_config
from peftcli.files import FORMAT_VERSION, TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into, save_trained

TASKS = ("sequence-classification", "causal-lm", "image-classification")
CASES = [(name, task) for name, m in METHODS.items() for task in TASKS if task in m.tasks]


def load_base(folder, task):
    return auto_class(task).from_pretrained(folder).eval()


def sample_inputs(task):
    generator = torch.Generator().manual_seed(1)
    if task == "image-classification":  # tiny ViT: 8x8 RGB images, 10 classes
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator), "labels": torch.tensor([3, 7])}
    ids = torch.randint(8, 60, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row: methods must respect the attention mask
    labels = torch.tensor([0, 1]) if task == "sequence-classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def outputs(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def perturb(model):
    """Move trainable weights away from their identity init, or merge bugs hide (e.g. LoRA's B = 0)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.05)


def perturb_discrete(state):
    """Reorder integer state (e.g. trigger ids): a reload that ignored the saved state would then differ."""
    for tensor in state.values():
        assert not tensor.is_floating_point(), "a method with no trainable tensors keeps discrete state"
        moved = tensor.roll(1)
        assert not torch.equal(moved, tensor), "the discrete state is constant, so saving it cannot be checked"
        tensor.copy_(moved)


@pytest.mark.parametrize("name,task", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_method_lifecycle(name, task, tiny_models, tmp_path):
    method = METHODS[name]
    cfg = lifecycle_config(name, method, tiny_models[task], task, tmp_path)
    folder = tiny_models[task]
    base_out = outputs(load_base(folder, task), sample_inputs(task))
    model = prepare_model(load_base(folder, task), name, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if in_head(n, trained_head(model))}
    if task == "sequence-classification":  # BERT reads [CLS] through its pooler: part of the head it trains
        assert {"bert.pooler", "classifier"} <= set(trained_head(model)), f"{name} left the head frozen"
        assert {n for n, _ in model.named_parameters() if in_head(n, ["bert.pooler", "classifier"])} <= head
    # A discrete method (trigger_tokens: vocabulary ids found by search) trains only the head by gradient; its
    # own trained state is integer extra_state, which must then exist and is what gets perturbed.
    assert trainable - head or method.extra_state, f"{name} made nothing trainable besides the head"

    perturb(model)
    if not trainable - head:
        perturb_discrete(method.extra_state(model))
    model.train()
    inputs = sample_inputs(task)
    loss = model(**inputs).loss
    for module in model.modules():
        if hasattr(module, "peft_aux_loss") and module.peft_aux_loss() is not None:
            loss = loss + module.peft_aux_loss()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable {n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    model.eval()
    trained_out = outputs(model, inputs)
    assert not torch.allclose(trained_out, base_out), "the perturbed method does not change the outputs"

    record = {"method": name, "format_version": FORMAT_VERSION}
    save_trained(model, tmp_path, record)
    reloaded = prepare_model(load_base(folder, task), name, cfg)
    load_tensors_into(reloaded, tmp_path / TENSORS)
    reloaded.eval()
    torch.testing.assert_close(outputs(reloaded, inputs), trained_out, rtol=0, atol=0)

    if method.mergeable:
        base_keys = set(load_base(folder, task).state_dict())
        merged = method.merge(reloaded, cfg)
        assert set(merged.state_dict()) == base_keys, "merged model is not the base layout"
        assert all(type(m).__module__.startswith(("transformers", "torch")) for m in merged.modules())
        torch.testing.assert_close(outputs(merged, inputs), trained_out, rtol=1e-4, atol=1e-4)
