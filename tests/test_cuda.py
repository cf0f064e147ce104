"""The CUDA path: a captured step equals the eager one, the step loop never waits for the host, checkpoints
move between devices. Skipped without CUDA; run on a GPU machine with `pytest -m cuda`."""

import copy

import pytest
import torch

import lenet
from lenet import augment, checkpoint, data, steps
from lenet.config import TrainConfig
from lenet.progress import Progress
from lenet.train import _Rng, _train_epoch, make_optimizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def test_the_captured_step_trains_as_the_eager_one(tiny_dataset):
    cfg = TrainConfig(model="modern", batch_size=32, lr=1e-3, device="cuda", val_split=0)
    torch.manual_seed(0)
    eager_net = lenet.build("modern").to(CUDA)
    graph_net = copy.deepcopy(eager_net)
    eager = steps.PlainStep(eager_net, make_optimizer(cfg, eager_net), 0.13, 0.31, 32, "cross-entropy",
                            torch.contiguous_format)  # fmt: skip
    graph = steps.CudaGraphStep(graph_net, make_optimizer(cfg, graph_net), 0.13, 0.31, 32, "cross-entropy")
    images, labels = tiny_dataset.train_images[:320].to(CUDA), tiny_dataset.train_labels[:320].to(CUDA)
    eager_net.train(), graph_net.train()
    for i in range(0, 320, 32):  # 3 eager warm-up steps, the capture, 6 replays
        lr = 1e-3 * (1 + i / 320)
        a, b = (
            eager(images[i : i + 32], labels[i : i + 32], lr, 1),
            graph(images[i : i + 32], labels[i : i + 32], lr, 1),
        )
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
        assert int(a[1]) == int(b[1])
    assert graph.graph is not None
    for (name, p), q in zip(eager_net.state_dict().items(), graph_net.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("distortions", ["none", "affine"])
def test_an_epoch_never_makes_the_device_wait_for_the_host(tiny_dataset, distortions):
    cfg = TrainConfig(model="modern", batch_size=32, device="cuda", val_split=0, augment=distortions)
    net = lenet.build("modern").to(CUDA)
    optimizer = make_optimizer(cfg, net)
    step, _ = steps.make_step(cfg, net, optimizer, 0.13, 0.31, CUDA, 1)
    assert isinstance(step, steps.CudaGraphStep)
    train = tiny_dataset.to(CUDA)
    rng = _Rng.seeded(0)
    schedule = lambda s: 1e-3  # noqa: E731
    _train_epoch(step, train, schedule, 0, 8, cfg, rng, Progress(8, "", False), lenet.train.Distributed())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop now raises
    try:
        order = data.batches(train.train_images, train.train_labels, 32, shuffle=True, generator=rng.data)
        for images, labels in list(order)[:-1]:  # whole batches
            images = augment.apply(distortions, images, rng.augment) if distortions != "none" else images
            step(images, labels, 1e-3, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fit_on_cuda_resumes_and_its_checkpoint_loads_on_the_cpu(tmp_path, tiny_dataset):
    options = dict(model="modern", epochs=2, batch_size=32, device="cuda", val_split=64, dataset=tiny_dataset)
    run = lenet.fit(out=str(tmp_path / "run"), log=lambda _: None, **options)
    assert run.history[-1]["test_acc"] > 0.5
    again = lenet.fit(out=str(tmp_path / "run"), resume=True, log=lambda _: None, **{**options, "epochs": 3})
    assert [r["epoch"] for r in again.history] == [1, 2, 3]
    clf = lenet.load(again.checkpoint, device="cpu")
    assert clf.evaluate(tiny_dataset).accuracy == pytest.approx(again.test_acc, abs=0.01)
    assert isinstance(checkpoint.load(again.last).optimizer_state["param_groups"][0]["lr"], float)
