"""Task options are checked where they are read: a wrong value is a ConfigError naming the
option, never a traceback from deep inside torch or a peer that does not come up."""

import pytest

from swarmnet.errors import ConfigError
from swarmnet.tasks import load_task

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("spec,options,message", [
    ("swarmnet.tasks.digits:task", {"hidden": "128"}, r"task.options.hidden = '128' must be of type int"),
    ("swarmnet.tasks.digits:task", {"hidden": True}, r"task.options.hidden = True must be of type int"),
    ("swarmnet.tasks.digits:task", {"nope": 1}, r"bad task.options .*unexpected keyword argument 'nope'"),
    ("swarmnet.tasks.lsq:task", {"samples": 0}, r"samples and dim must be >= 1, got samples=0"),
    ("swarmnet.tasks.lsq:task", {"dim": 0}, r"samples and dim must be >= 1, got samples=10000, dim=0"),
    ("swarmnet.tasks.lsq:task", {"noise": float("nan")}, r"noise must be a finite number >= 0, got nan"),
    ("swarmnet.tasks.logreg:task", {"l2": -1.0}, r"l2 must be a finite number >= 0, got -1.0"),
    ("swarmnet.tasks.textlm:task", {"heads": 0}, r"task.options.heads 0"),
    ("swarmnet.tasks.textlm:task", {"test_fraction": 0.0}, r"task.options.test_fraction 0.0 must be between 0 and 1"),
    ("swarmnet.tasks.textlm:task", {"context": 100_000}, r"leaves no window .* for testing; lower context"),
    ("swarmnet.tasks.textlm:task", {"corpus_bytes": 5000}, r"task.options.corpus_bytes 5000 must be at least"),
    # before the data is looked for: this is the error to fix whether the data is there or not
    ("swarmnet.tasks.fashion:task", {"path": "/nonexistent", "test_subset": -1}, r"task.options.test_subset = -1"),
    ("swarmnet.tasks.cifar:task", {"path": "/nonexistent", "train_subset": -5}, r"task.options.train_subset = -5"),
])
def test_a_bad_task_option_is_a_config_error_that_names_it(spec, options, message):
    with pytest.raises(ConfigError, match=message):
        load_task(spec, options)


def test_a_model_that_cannot_be_built_from_the_options_is_a_config_error_that_names_them():
    task = load_task("swarmnet.tasks.digits:task", {"hidden": -5})  # the factory does not look at it
    with pytest.raises(ConfigError, match=r"task.options \{'hidden': -5\}: building the model failed: "
                                          r"RuntimeError: .*negative dimension"):
        task.build_model()


def test_an_int_where_a_float_is_expected_is_fine():
    assert load_task("swarmnet.tasks.lsq:task", {"noise": 2, "samples": 64}).num_samples == 64


def test_a_task_that_fails_is_named_with_where_it_failed(tmp_path, monkeypatch):
    (tmp_path / "broken_task.py").write_text("def task():\n    raise RuntimeError('dataset not found at /data/x')\n")
    (tmp_path / "typo_task.py").write_text("def task(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"task 'broken_task:task' with task.options \{\} failed: RuntimeError: "
                                          r"dataset not found at /data/x \(at .*broken_task.py:2\); fix the task"):
        load_task("broken_task:task")
    with pytest.raises(ConfigError, match=r"importing 'typo_task' failed: SyntaxError: .*typo_task.py, line 1"):
        load_task("typo_task:task")


def test_a_task_module_in_the_folder_a_command_runs_in_is_found_as_the_peers_find_it(tmp_path, monkeypatch):
    """`swarmnet up` starts its peers with `python -m swarmnet`, which imports from the folder it
    runs in; the `swarmnet` command itself did not, so `up` refused a task its peers could load."""
    import os
    import sys

    (tmp_path / "my_folder_task.py").write_text("from swarmnet.tasks.lsq import task\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    assert load_task("my_folder_task:task", {"samples": 64}).num_samples == 64
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_task_module': .*install it, or add its folder "
                                          r"to PYTHONPATH"):
        load_task("no_such_task_module:task")


def _fashion_missing() -> str | None:
    try:
        load_task("swarmnet.tasks.fashion:task", {"train_subset": 10, "test_subset": 10})
    except ConfigError as exc:
        return f"Fashion-MNIST data absent ({exc})"
    return None


@pytest.mark.parametrize("spec,options", [
    ("swarmnet.tasks.digits:task", {}),
    ("swarmnet.tasks.logreg:task", {}),
    ("swarmnet.tasks.lsq:task", {"samples": 64}),
    ("swarmnet.tasks.textlm:task", {}),
    pytest.param("swarmnet.tasks.fashion:task", {"train_subset": 100, "test_subset": 100},
                 marks=pytest.mark.skipif(_fashion_missing() is not None, reason=_fashion_missing() or "")),
])
def test_every_bundled_evaluation_runs_on_the_models_device(spec, options):
    """A GPU peer evaluates its own model where it lives. The meta device stands in for a GPU:
    the evaluation's tensor work runs there, and only reading the result out fails; with test
    data left on the CPU it fails on the first operation, mixing devices."""
    task = load_task(spec, options)
    with pytest.raises((RuntimeError, NotImplementedError), match=r"meta tensors?|of meta tensor"):
        task.evaluate(task.build_model().to("meta"))
