"""Evaluating an averaged model: BatchNorm statistics are recomputed, never averaged."""

import torch
from torch import nn

from swarmnet.evaluation import evaluate_averaged, recompute_batchnorm, saved_to
from swarmnet.tasks import Task


def bn_task(n=512, shift=3.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen) * 2.0 + shift
    y = (x[:, 0] > shift).long()

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def evaluate(model):
        return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    return Task(name="bn", build_model=lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)),
                train=(x, y), loss=loss, evaluate=evaluate, metric="accuracy", higher_is_better=True)


def test_recompute_batchnorm_resets_and_averages_over_the_batches_exactly():
    task = bn_task()
    model = task.build_model()
    bn = model[0]
    bn.running_mean.fill_(100.0)  # as if averaged from elsewhere: meaningless for this model
    bn.running_var.fill_(1e-4)
    used = recompute_batchnorm(model, task, batches=8, batch_size=64, seed=1)
    assert used == 8 and not model.training and bn.momentum == 0.1  # momentum restored
    gen = torch.Generator().manual_seed(1)
    batches = [task.train[0][torch.randint(512, (64,), generator=gen)] for _ in range(8)]
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0) for b in batches]).mean(0)  # unbiased, as BatchNorm keeps
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert int(bn.num_batches_tracked) == 8


def test_evaluation_of_an_average_uses_its_own_statistics():
    task = bn_task()
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        task.loss(model, task.train).backward()
        opt.step()
    model[0].reset_running_stats()  # statistics of some other model: evaluation collapses
    model.eval()
    with torch.no_grad():
        stale = task.evaluate(model)["accuracy"]
    result = evaluate_averaged(model, task, batch_size=64, seed=0)
    assert result["batchnorm_batches"] == 20
    assert result["eval"]["accuracy"] > 0.9 > stale + 0.2, (result, stale)


def test_models_without_batchnorm_are_left_alone():
    task = bn_task()
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    assert recompute_batchnorm(model, task) == 0 and torch.equal(model.weight, before)


def test_a_saved_average_restores_its_statistics_and_a_failed_save_keeps_what_was_there(tmp_path):
    task = bn_task()
    model = task.build_model()
    evaluate_averaged(model, task, batch_size=64, seed=0)
    assert saved_to(model, tmp_path / "avg.pt") == {"model": str(tmp_path / "avg.pt")}
    fresh = task.build_model()
    fresh.load_state_dict(torch.load(tmp_path / "avg.pt", weights_only=True))
    assert torch.equal(fresh[0].running_mean, model[0].running_mean) and int(fresh[0].num_batches_tracked) == 20
    (tmp_path / "file").write_text("not a folder")
    failed = saved_to(model, tmp_path / "file" / "avg.pt")
    assert failed["model_error"].startswith(f"cannot write {tmp_path / 'file'}") and "writable path" in failed["model_error"]
    assert (tmp_path / "file").read_text() == "not a folder"
