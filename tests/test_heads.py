import pytest
import torch
from torch.testing import assert_close

from adamix_zoo import AdaMixConfig, AdaMixModel
from adamix_zoo.heads import ClassificationHead, TaskModel, load_head, save_head
from tests.tiny import tiny_batch, tiny_model


def test_mean_pooling_ignores_padding():
    head = ClassificationHead(4, 2, pooling="mean")
    hidden = torch.randn(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    assert_close(head.pool(hidden, mask), hidden[:, :2].mean(1))
    assert_close(ClassificationHead(4, 2, pooling="cls").pool(hidden, mask), hidden[:, 0])


def test_task_model_on_adamix_backbone_and_head_round_trip(tmp_path):
    backbone = AdaMixModel(tiny_model("bert", head="base"), AdaMixConfig())
    assert backbone.head_modules == []
    model = TaskModel(backbone, ClassificationHead(32, 3)).eval()
    logits = model(**tiny_batch())
    assert logits.shape == (4, 3)
    path = save_head(model.head, tmp_path / "head.safetensors")
    loaded = TaskModel(backbone, load_head(path)).eval()
    assert torch.equal(loaded(**tiny_batch()), logits)


def test_head_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling='max'.*mean, cls"):
        ClassificationHead(4, 2, pooling="max")
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read head file"):
        load_head(bad)
