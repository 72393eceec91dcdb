import pytest

from adamix_zoo import AdaMixConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("kind", "prefix", "lora, adapter"),
        ("sharing", "both", "up, down, none"),
        ("placement", "everywhere", "ffn, houlsby"),
        ("eval_routing", "best", "merged, fixed, random"),
        ("activation", "swish2", "relu, gelu, tanh, silu"),
    ],
)
def test_invalid_choice_names_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}='{value}'.*{allowed}"):
        AdaMixConfig(**{field: value})


@pytest.mark.parametrize("field", ["num_experts", "rank", "alpha", "bottleneck"])
def test_non_positive_sizes_rejected(field):
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        AdaMixConfig(**{field: 0})


def test_other_invalid_values():
    with pytest.raises(ValueError, match="dropout"):
        AdaMixConfig(dropout=1.0)
    with pytest.raises(ValueError, match="eval_expert=4 is out of range"):
        AdaMixConfig(num_experts=4, eval_expert=4)
    with pytest.raises(ValueError, match="consistency_weight"):
        AdaMixConfig(consistency_weight=-1)
    with pytest.raises(ValueError, match="target_modules"):
        AdaMixConfig(target_modules=[])


def test_round_trip_and_unknown_fields():
    cfg = AdaMixConfig(kind="adapter", num_experts=8, sharing="down", target_modules=["dense"])
    assert AdaMixConfig.from_dict(cfg.to_dict()) == cfg
    assert AdaMixConfig(rank=4, alpha=32).scale == 8.0
    with pytest.raises(ValueError, match="unknown AdaMixConfig fields: colour"):
        AdaMixConfig.from_dict({"colour": "red"})
