"""Tiny random-init Hugging Face models (no download), token datasets and a Lightning wrapper for
the tests of Hugging Face and PEFT support. Importing this module skips the importing test
module where ``transformers`` is not installed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("transformers")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_memo import IndexedDataset  # noqa: E402

VOCAB, T, N = 100, 8, 16


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    """``BertForSequenceClassification`` (2 labels) of the CI config, weights from ``seed``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg)


def lora_bert(seed: int = 0) -> nn.Module:
    """:func:`tiny_bert` with LoRA adapters (r=4) on the attention query / value projections;
    the adapters' B matrices get random values so their gradients are not degenerate."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(seed), LoraConfig(target_modules=["query", "value"], r=4))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """``GPT2Model`` of the CI config without dropout (train and eval passes agree)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2Model(cfg)


LENGTHS = [8, 5, 3, 6, 8, 2, 7, 4, 5, 8, 3, 6, 4, 7, 2, 5]  # real tokens of the N samples


def token_items(left: bool = False, seed: int = 0, n: int = N) -> List[Dict[str, Any]]:
    """``n`` dict items ``{input_ids, attention_mask, label, text}`` of ``T`` tokens, padded
    (pad id 0) on the right or, with ``left``, on the left; ``LENGTHS`` real tokens each. The
    label is whether the first real token id is even (learnable), the text names the tokens."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        k = LENGTHS[i % len(LENGTHS)]
        ids = torch.randint(1, VOCAB, (k,), generator=g)
        pad = torch.zeros(T - k, dtype=torch.long)
        mask = torch.cat(
            [torch.zeros(T - k), torch.ones(k)] if left else [torch.ones(k), torch.zeros(T - k)]
        )
        items.append(
            {
                "input_ids": torch.cat([pad, ids] if left else [ids, pad]),
                "attention_mask": mask.long(),
                "label": int(ids[0]) % 2,
                "text": f"sample {i}: " + " ".join(f"w{int(t)}" for t in ids),
            }
        )
    return items


class HFClassifier(L.LightningModule):
    """A Hugging Face sequence classifier (``BertForSequenceClassification``, a PEFT model of
    it) on dict batches ``{input_ids, attention_mask, label, index}``; plain SGD on the trainable
    parameters only."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def per_sample_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["label"], reduction="none")

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class GPT2Classifier(HFClassifier):
    """``GPT2Model`` + a linear head on the last position (left padding)."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__(model, lr)
        self.head = nn.Linear(model.config.n_embd, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, -1])


def loader(items: Sequence[Dict[str, Any]], batch_size: int = 4) -> DataLoader:
    """A sequential loader over ``IndexedDataset(items)`` (dict batches with ``index``)."""
    return DataLoader(IndexedDataset(list(items)), batch_size=batch_size, shuffle=False)


def fit(
    tmp_path: Any,
    model: L.LightningModule,
    callbacks: Sequence[Any],
    items: Optional[Sequence[Dict[str, Any]]] = None,
    epochs: int = 1,
    logger: Any = False,
    val: Optional[DataLoader] = None,
) -> L.Trainer:
    """``Trainer.fit`` on the CPU, quiet, in ``tmp_path``; returns the trainer."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        limit_val_batches=0 if val is None else 1.0,
    )
    trainer.fit(model, loader(token_items() if items is None else items), val)
    return trainer


class FakeWriter:
    """Stands in for the TensorBoard ``SummaryWriter``: records ``add_text`` calls."""

    def __init__(self) -> None:
        self.texts: Dict[str, List[str]] = {}

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.setdefault(tag, []).append(text)

    def add_histogram(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        pass


def layer_outputs(model: nn.Module, names: Sequence[str], **inputs: Any) -> Dict[str, Any]:
    """Raw outputs (and first inputs) of named submodules in one eval, no-grad forward pass,
    with plain ``register_forward_hook`` (an oracle independent of lightning_memo's hooks)."""
    mods = dict(model.named_modules())
    seen: Dict[str, Any] = {}
    handles = [
        mods[n].register_forward_hook(
            lambda m, i, o, n=n: seen.update({n: o, n + ":input": i[0] if i else None})
        )
        for n in names
    ]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def batch_of(items: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """The token tensors of ``items`` stacked: ``{input_ids, attention_mask}`` (n, T)."""
    return {
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "attention_mask": torch.stack([it["attention_mask"] for it in items]),
    }
