"""Methods that hook into attention either do their work or refuse to start: never a silent no-op when a
transformers release renames the arguments their hooks read (the key/value cache, the hidden states)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.bert import modeling_bert
from transformers.models.llama import modeling_llama

from peftcli.errors import UserError
from peftcli.methods import METHODS

from test_lifecycle import load_base, outputs, perturb, sample_inputs
from peftcli.methods.install import prepare_model

PREFIX_METHODS = ("prefix_tuning", "p_tuning_v2", "mam", "unipelt")
ATTENTION = {"sequence-classification": modeling_bert.BertSelfAttention,
             "causal-lm": modeling_llama.LlamaAttention}


def inject(name, folder, task):
    return prepare_model(load_base(folder, task), name, METHODS[name].config_cls())


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_unipelt_gated_prefix_reaches_attention(task, tiny_models):
    """Closing every prefix gate must change the outputs: the gated prefix is part of the model."""
    torch.manual_seed(0)
    model = inject("unipelt", tiny_models[task], task)
    perturb(model)
    inputs = sample_inputs(task)
    opened = outputs(model, inputs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("prefix_gate.gate.bias"):
                p.fill_(-60.0)  # sigmoid(-60) = 0: no prefix keys/values
    assert not torch.allclose(outputs(model, inputs), opened, atol=1e-5)


def test_unipelt_gates_get_gradients(tiny_models):
    model = inject("unipelt", tiny_models["causal-lm"], "causal-lm")
    perturb(model)
    model.train()
    model(**sample_inputs("causal-lm")).loss.backward()
    gates = [p for n, p in model.named_parameters() if "prefix_gate" in n]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def _without_cache_argument(cls):
    original = cls.forward

    def forward(self, hidden_states, *args, **kwargs):  # a layer that takes the cache under another name
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        return original(self, hidden_states, *args, **kwargs)

    return forward


@pytest.mark.parametrize("name", PREFIX_METHODS)
@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_attention_without_a_cache_argument_is_refused_at_inject(name, task, tiny_models, monkeypatch):
    cls = ATTENTION[task]
    monkeypatch.setattr(cls, "forward", _without_cache_argument(cls))
    with pytest.raises(UserError, match=f"{name}.*{cls.__name__}.forward takes neither `cache`"):
        inject(name, tiny_models[task], task)


@pytest.mark.parametrize("name", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_that_never_reaches_attention_is_an_error(name, tiny_models, monkeypatch):
    """The signature names the cache, yet the layer runs without it (and without the mask that would have shown
    the prefix's length): the forward fails, naming the layers, rather than training a model with no prefix."""
    task = "sequence-classification"
    model = inject(name, tiny_models[task], task)
    original = modeling_bert.BertSelfAttention.forward

    def drops_cache(self, hidden_states, *args, **kwargs):
        for name in ("attention_mask", "cache", "past_key_values"):
            kwargs.pop(name, None)
        return original(self, hidden_states, **kwargs)

    monkeypatch.setattr(modeling_bert.BertSelfAttention, "forward", drops_cache)
    with pytest.raises(UserError, match=r"prefix never reached the attention of layers \[0, 1\]"):
        outputs(model, sample_inputs(task))


def test_layer_whose_input_is_not_the_hidden_states_is_refused(tiny_models, monkeypatch):
    cls = modeling_bert.BertIntermediate  # the FFN sublayer whose input a parallel adapter reads
    original = cls.forward

    def forward(self, states_and_mask, *args, **kwargs):
        return original(self, states_and_mask, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    with pytest.raises(UserError, match="parallel adapter reads the hidden states.*'states_and_mask'"):
        inject("parallel_adapter", tiny_models["sequence-classification"], "sequence-classification")


def test_prefix_is_passed_under_the_current_cache_name(tiny_models, recwarn):
    """No deprecated `past_key_values` alias on the way in (it goes away in transformers 5.40)."""
    model = inject("prefix_tuning", tiny_models["causal-lm"], "causal-lm")
    outputs(model, sample_inputs("causal-lm"))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
