"""Prompt methods: masks, positions and labels are exact, generation with the KV cache matches step-by-step
decoding, gradient checkpointing keeps the gradients, and merge-export refuses with a hint."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftcli.methods import METHODS
from peftcli.methods.prefix import split_states
from peftcli.methods.install import prepare_model

PROMPT_METHODS = ["prefix_tuning", "prompt_tuning", "soft_trigger_tokens", "p_tuning", "p_tuning_v2"]
TEXT = "write a response"


def llama(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def bert(folder):
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def injected(load, folder, name, **options):
    return prepare_model(load(folder), name, METHODS[name].config_cls(**options)).eval()


def word_ids(folder, text=TEXT):
    return torch.tensor(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"])


def test_text_prompt_on_llama_equals_the_text_in_the_input(tiny_llama):
    """A prompt initialised from a text is the text: logits, positions and the right-padded row all match."""
    words = word_ids(tiny_llama)
    model = injected(llama, tiny_llama, "prompt_tuning", num_virtual_tokens=len(words), init="text", init_text=TEXT)
    ids = torch.randint(8, 60, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    base = llama(tiny_llama)
    for row, length in enumerate((7, 5)):
        full = torch.cat([words, ids[row, :length]]).unsqueeze(0)
        expected = base(input_ids=full).logits[0, len(words):]  # logits come back at the input's length
        torch.testing.assert_close(out.logits[row, :length], expected, rtol=1e-5, atol=1e-5)
    # prompt positions never carry loss: the loss is the base loss on the input tokens alone
    labels = torch.cat([torch.full((2, len(words)), -100), ids.masked_fill(mask == 0, -100)], 1)
    embeds = torch.cat([base.get_input_embeddings()(words).expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, len(words), dtype=torch.long), mask], 1)
    reference = base(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
    masked = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(masked, reference)


@pytest.mark.parametrize("name,position", [("prompt_tuning", 1), ("soft_trigger_tokens", -1), ("trigger_tokens", -1)])
def test_text_prompt_on_bert_equals_the_text_in_the_input(tiny_bert, name, position):
    """After [CLS] (prompt tuning) or before [SEP] (triggers at -1), with token types and a padded row."""
    words = word_ids(tiny_bert)
    options = ({"num_virtual_tokens": len(words), "init": "text", "init_text": TEXT} if name == "prompt_tuning"
               else {"num_tokens": len(words), "position": position, "init_text": TEXT})
    model = injected(bert, tiny_bert, name, **options)
    ids = torch.randint(8, 60, (2, 8))
    ids[:, 0], ids[0, -1], ids[1, 5] = 4, 5, 5  # [CLS] ... [SEP], row 1 padded after its [SEP]
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    base = bert(tiny_bert)
    for row, length in enumerate((8, 6)):
        tokens = ids[row, :length]
        at = position if position >= 0 else length + position
        full = torch.cat([tokens[:at], words, tokens[at:]]).unsqueeze(0)
        torch.testing.assert_close(out[row], base(input_ids=full).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_on_llama_equals_the_cache_of_a_real_text(tiny_llama, name):
    """Prefixes set to the base model's keys/values of a text X give base(X + Y) on Y: mask and positions
    (which start after the prefix) are exactly right, for a right-padded row too."""
    base = llama(tiny_llama)
    words = word_ids(tiny_llama)
    cache = base(input_ids=words.unsqueeze(0), use_cache=True).past_key_values
    model = injected(llama, tiny_llama, name, num_virtual_tokens=len(words))
    source = model.prefix_encoder if name == "prefix_tuning" else model.deep_prompt
    flat = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # L,2,H,P,D
    flat = flat.permute(0, 1, 3, 2, 4).flatten(3)
    source.states = lambda batch: split_states(flat, batch, source.kv_heads, source.head_dim)
    ids = torch.randint(8, 60, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = model(input_ids=ids, attention_mask=mask).logits
    for row, length in enumerate((6, 4)):
        expected = base(input_ids=torch.cat([words, ids[row, :length]]).unsqueeze(0)).logits[0, len(words):]
        torch.testing.assert_close(out[row, :length], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PROMPT_METHODS + ["trigger_tokens"])
def test_bert_rows_do_not_see_padding(tiny_bert, name):
    """A row scored alone equals the same row inside a padded batch."""
    model = injected(bert, tiny_bert, name)
    ids = torch.randint(8, 60, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    batch = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=ids[1:, :6], attention_mask=mask[1:, :6]).logits
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-5)


def greedy_by_hand(model, ids, steps):
    """Step-by-step greedy decoding through the plain forward (no cache, no generate)."""
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(input_ids=ids.unsqueeze(0)).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1)])
    return ids


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning", "p_tuning", "p_tuning_v2", "soft_trigger_tokens"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_left_padded_generation(tiny_llama, name, use_cache):
    model = injected(llama, tiny_llama, name)
    torch.manual_seed(0)  # the tiny model's logits are flat: a fixed prompt keeps greedy choices clear of near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # a prompt that clearly changes what is generated
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.padding_side = "left"
    prompts = ["good movie", "a very bad and long movie ."]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    base_out = llama(tiny_llama).generate(**batch, max_new_tokens=4, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(out, base_out), "the prompt does not change generation"
    for row, text in enumerate(prompts):
        ids = torch.tensor(tokenizer(text)["input_ids"])
        expected = greedy_by_hand(model, ids, 4)
        assert out[row, -len(expected):].tolist() == expected.tolist()


def gradients(model, inputs):
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both runs
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", PROMPT_METHODS)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_keeps_gradients(tiny_bert, tiny_llama, name, kind):
    load, folder = (bert, tiny_bert) if kind == "bert" else (llama, tiny_llama)
    model = injected(load, folder, name)
    ids = torch.randint(8, 60, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = torch.tensor([0, 1]) if kind == "bert" else ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    plain = gradients(model, inputs)
    model.gradient_checkpointing_enable()
    checkpointed = gradients(model, inputs)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert plain[key].abs().sum() > 0, f"{key} got a zero gradient"
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_not_mergeable_with_a_hint(name):
    method = METHODS[name]
    assert method.merge is None and "peft export" in method.merge_hint
