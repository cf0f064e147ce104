import pytest
import torch

from lenet.models import MODEL_NAMES, build, count_parameters, layer_table

CLASSIC_SHAPES = [
    ("conv1", (6, 28, 28)),
    ("act1", (6, 28, 28)),
    ("pool1", (6, 14, 14)),
    ("conv2", (16, 10, 10)),
    ("act2", (16, 10, 10)),
    ("pool2", (16, 5, 5)),
    ("flatten", (400,)),
    ("fc1", (120,)),
    ("act3", (120,)),
    ("fc2", (84,)),
    ("act4", (84,)),
    ("fc3", (10,)),
]


def test_classic_is_the_tutorial_network():
    model = build("classic")
    assert count_parameters(model) == 61_706
    rows = layer_table(model, (1, 28, 28))
    assert [(name, shape) for name, shape, _ in rows] == CLASSIC_SHAPES
    assert {name: params for name, _, params in rows if params} == {
        "conv1": 156,
        "conv2": 2_416,
        "fc1": 48_120,
        "fc2": 10_164,
        "fc3": 850,
    }
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == [
        "Conv2d", "Sigmoid", "AvgPool2d", "Conv2d", "Sigmoid", "AvgPool2d",
        "Flatten", "Linear", "Sigmoid", "Linear", "Sigmoid", "Linear",
    ]  # fmt: skip


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_iterate_layer_by_layer_like_the_tutorial(name):
    model = build(name).eval()
    x = torch.rand(3, 1, 28, 28)
    y = x
    for layer in model:
        y = layer(y)
    assert y.shape == (3, 10)
    torch.testing.assert_close(y, model(x))


def test_modern_layers_and_parameters():
    model = build("modern")
    names = [name for name, _ in model.named_children()]
    assert names[:4] == ["conv1", "bn1", "act1", "pool1"]
    assert [type(m).__name__ for m in model if "Norm" in type(m).__name__] == [
        "BatchNorm2d", "BatchNorm2d", "BatchNorm1d", "BatchNorm1d",
    ]  # fmt: skip
    assert count_parameters(model) == 61_932
    assert layer_table(model)[-1][1] == (10,)


def test_layer_table_honours_batch_and_leaves_mode_alone():
    model = build("modern").train()
    rows = layer_table(model, (1, 28, 28), batch=4)
    assert rows[0][1] == (6, 28, 28)
    assert model.training


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'lenet9'"):
        build("lenet9")
