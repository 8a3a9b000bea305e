"""Padding-free packing: no attention across examples, and the same loss and gradients as the padded batch."""
from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from peftcli.workflows import train as commands
from peftcli.errors import UserError
from peftcli.data.causal_lm import encode_causal_lm
from peftcli.methods.lora import LoraConfig
from peftcli.config.sections import DataSection, ModelSection
from peftcli.data.collators import CausalLMCollator, PackedCausalLMCollator
from peftcli.data.prepare import prepare
from tiny import make_tokenizer
from peftcli.methods.install import prepare_model

ROWS = [{"instruction": "write a short review of the movie", "input": "", "output": "great acting and a fine plot"},
        {"instruction": "is this review positive", "input": "the film was dull", "output": "no"},
        {"instruction": "summarise", "input": "a long slow movie with good music and bad jokes", "output": "mixed"}]


def features(train_on_prompt=False):
    section = DataSection(train="x", max_length=64, train_on_prompt=train_on_prompt)
    return encode_causal_lm(ROWS, "data.train", make_tokenizer("llama"), section)


def lora_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = False  # as `peft train` sets it for packing
    model = prepare_model(model, "lora", LoraConfig(target_modules="all-linear"))
    with torch.no_grad():  # B = 0 would hide adapter gradients through the attention path
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_and_grads_equal_padded(tiny_llama, train_on_prompt):
    feats = features(train_on_prompt)
    padded = CausalLMCollator(pad_token_id=0)(feats)
    packed = PackedCausalLMCollator()(feats)
    assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    assert (packed["position_ids"][0] == 0).sum() == len(feats)
    # The Trainer counts labels[..., 1:] to normalise the loss: both layouts must count the same tokens.
    assert (packed["labels"][..., 1:] != -100).sum() == (padded["labels"][..., 1:] != -100).sum()
    model = lora_model(tiny_llama)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_pad, grads_pad), (loss_pack, grads_pack) = results
    torch.testing.assert_close(loss_pack, loss_pad, rtol=0, atol=1e-5)
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, rtol=1e-4, atol=1e-6)


def test_packed_examples_do_not_attend_to_each_other(tiny_llama):
    feats = features()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    with torch.no_grad():
        packed = model(**{k: v for k, v in PackedCausalLMCollator()(feats).items() if k != "labels"}).logits[0]
        start = 0
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
            start += len(alone)


def test_packing_is_refused_for_classification():
    section = DataSection(train="x", packing=True)
    with pytest.raises(UserError, match="data.packing"):
        prepare("sequence-classification", make_tokenizer("bert"), section, ModelSection(name_or_path="m"),
                [{"text": "a", "label": 0}, {"text": "b", "label": 1}], None)


def _train(tiny_llama, tmp_path, name, **data):
    rows = ROWS * 4
    data_file = tmp_path / "rows.json"
    data_file.write_text(__import__("json").dumps(rows), encoding="utf-8")
    recipe = {"model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
              "data": {"train": str(data_file), "max_length": 64, **data},
              "method": {"name": "lora", "target_modules": "all-linear"},
              "train": {"output_dir": str(tmp_path / name), "max_steps": 3, "per_device_train_batch_size": 4,
                        "learning_rate": 1e-2, "logging_steps": 1, "seed": 5, "use_cpu": True}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = commands.train(str(path))
    log = [__import__("json").loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in log if "loss" in row]


def test_peft_train_packed_matches_padded_loss_curve(tiny_llama, tmp_path):
    padded = _train(tiny_llama, tmp_path, "padded")
    packed = _train(tiny_llama, tmp_path, "packed", packing=True)
    assert len(packed) == len(padded) == 3
    # Logged losses are rounded to 4 significant digits by the Trainer.
    for a, b in zip(packed, padded):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))


def _varlen_model(folder):
    from peftcli.models.kernels import varlen

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=varlen.register()).eval()
    model.config.use_cache = False
    return model


def test_varlen_attention_equals_masked_sdpa_on_packed_rows(tiny_llama):
    """The boundaries path (CPU: block mask from cu_seq_lens) gives the logits of transformers' own mask path."""
    batch = {k: v for k, v in PackedCausalLMCollator(boundaries=True)(features()).items() if k != "labels"}
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    assert batch["max_length_q"] == max(len(f["input_ids"]) for f in features())
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    reference.config.use_cache = False
    plain = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}
    with torch.no_grad():
        torch.testing.assert_close(_varlen_model(tiny_llama)(**batch).logits, reference(**plain).logits,
                                   rtol=1e-5, atol=1e-5)


def test_varlen_model_scores_padded_batches_like_sdpa(tiny_llama):
    """Evaluation and generation pad their batches (no boundaries): the padding mask must still apply, on either
    side."""
    tokenizer = make_tokenizer("llama")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model = _varlen_model(tiny_llama)
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(["a short one", "a much longer row of several words here"], return_tensors="pt",
                          padding=True)
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits[keep], reference(**batch).logits[keep],
                                       rtol=1e-5, atol=1e-5)


def test_packed_runs_default_to_varlen_and_refuse_row_prefix_methods(tmp_path):
    from peftcli.methods.recipes import recipe_from_dict

    base = {"model": {"name_or_path": "m", "task": "causal-lm"}, "data": {"train": "x.json", "packing": True},
            "train": {"output_dir": str(tmp_path / "out")}}
    recipe = recipe_from_dict({**base, "method": {"name": "lora"}}, "r.yaml", tmp_path)
    assert recipe.model.attn_implementation == "varlen"
    with pytest.raises(UserError, match="data.packing: method 'prefix_tuning'"):
        recipe_from_dict({**base, "method": {"name": "prefix_tuning"}}, "r.yaml", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen kernel: CUDA only")
def test_flash_varlen_matches_masked_path_on_cuda():
    from peftcli.models.kernels import varlen

    torch.manual_seed(0)
    lengths = [37, 200, 5, 120]
    cu_seq = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for path in (lambda: varlen._flash(q, k, v, cu_seq, max(lengths), None),
                 lambda: varlen._masked(q.float(), k.float(), v.float(), cu_seq, 0.0, None)):
        out = path()
        q.grad = k.grad = v.grad = None
        out.backward(grad.to(out.dtype))
        results.append([out.float()] + [t.grad.float().clone() for t in (q, k, v)])
    for fast, exact in zip(*results):
        torch.testing.assert_close(fast, exact, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen kernel: CUDA only")
def test_varlen_takes_the_flash_kernel_for_an_fp32_model_under_autocast(tiny_llama, monkeypatch):
    """fp32 weights + bf16 autocast (train.bf16 on an fp32 model) must still reach the flash kernel."""
    from peftcli.models.kernels import varlen

    calls = []
    flash = varlen._flash
    monkeypatch.setattr(varlen, "_flash", lambda *a: calls.append(a[0].dtype) or flash(*a))
    model = _varlen_model(tiny_llama).cuda()
    batch = {k: (v.cuda() if torch.is_tensor(v) else v)
             for k, v in PackedCausalLMCollator(boundaries=True)(features()).items() if k != "labels"}
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        model(**batch)
    assert calls and set(calls) == {torch.bfloat16}
