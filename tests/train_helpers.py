"""A real PeftTrainer (accelerate-wrapped) on a tiny model and the demo reviews, for training-time tests."""
from __future__ import annotations

import json
from pathlib import Path

from peftcli.methods import METHODS
from peftcli.config.sections import OptimSection

from tiny import REVIEWS
from peftcli.files import FORMAT_VERSION
from peftcli.methods.install import prepare_model
from peftcli.methods.tensors import save_trained


def review_features(tokenizer, rows: int = 48) -> list[dict]:
    lines = (REVIEWS / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    data = [json.loads(line) for line in lines]
    encoded = tokenizer([d["text"] for d in data], truncation=True, max_length=32)
    return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "labels": int(d["label"] == "positive")} for i, d in enumerate(data)]


def make_trainer(folder: Path, out: Path, method: str = "full", cfg=None, rules: OptimSection | None = None,
                 callbacks=(), model=None, **train_args):
    """A PeftTrainer over 48 reviews (batch 8). `train_args` override TrainingArguments."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, \
        TrainingArguments

    from peftcli.training.trainer import PeftTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = cfg if cfg is not None else METHODS[method].config_cls()
    if model is None:
        model = prepare_model(AutoModelForSequenceClassification.from_pretrained(folder), method, cfg)
    args = TrainingArguments(**{"output_dir": str(out), "report_to": "none", "save_strategy": "no",
                                "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_steps": 8,
                                "logging_steps": 2, "remove_unused_columns": False, "label_names": ["labels"],
                                "dataloader_num_workers": 0, "use_cpu": True, "seed": 0, **train_args})
    record = {"method": method, "format_version": FORMAT_VERSION}
    all_callbacks = list(callbacks) + (METHODS[method].callbacks(cfg, model) if METHODS[method].callbacks else [])
    return PeftTrainer(model=model, args=args, train_dataset=review_features(tokenizer),
                       data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                       optim_rules=rules or OptimSection(), callbacks=all_callbacks,
                       save_trained=lambda m, d: save_trained(m, d, record))
