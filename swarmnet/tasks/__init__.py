"""The task plug-in interface: ``module:function`` returning a :class:`Task`.

A task bundles what a peer trains: a model builder, the training tensors (each peer takes its
shard), the loss of a batch and an optional evaluation on held-out data. The runtime seeds torch,
Python's ``random`` and ``numpy.random`` before ``build_model`` (:func:`build_seeded`) so every
peer starts from the same initialization (SPEC 4 item 6), wherever it was started.

Bundled tasks: ``swarmnet.tasks.lsq:task`` (synthetic least squares),
``swarmnet.tasks.logreg:task`` (logistic regression on real data),
``swarmnet.tasks.digits:task`` (handwritten digits, the quickstart default).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import random
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from swarmnet.errors import ConfigError

Batch = tuple[Tensor, ...]


class BadTaskResult(TypeError):
    """A task's function returned what swarmnet cannot use. The message says what it returned
    and what it must return; :func:`what_failed` gives no place for it (it would be swarmnet's
    own check, not the task's code)."""


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    build_model: Callable[[], nn.Module]
    """Builds a fresh model; the runtime seeds torch, ``random`` and ``numpy.random`` first
    (with the same seed on every peer) so all peers start identical, even started on separate
    hosts."""
    train: Batch
    """In-memory training tensors sharing the first (sample) dimension."""
    loss: Callable[[nn.Module, Batch], Tensor]
    """Mean loss of ``model`` on a batch (a tuple sliced from ``train``): a one-element tensor
    that requires grad."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    """Held-out metrics of a model, a dict of numbers, e.g. {"loss": ..., "accuracy": ...};
    runs under no_grad."""
    metric: str = "loss"
    """The headline key of ``evaluate``'s result."""
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        # Refused here, where the task is made, not at the first use deep inside a peer.
        if isinstance(self.build_model, nn.Module) or not callable(self.build_model):
            given = "a model (an nn.Module instance)" if isinstance(self.build_model, nn.Module) else \
                type(self.build_model).__name__
            raise ConfigError(f"task {self.name}: build_model is {given}; it must be a function that builds the "
                              "model, e.g. build_model=lambda: MyNet(): every peer builds its own, seeded alike")
        if not isinstance(self.train, (tuple, list)):
            hint = f"e.g. train=(x,) for one {type(self.train).__name__}" if isinstance(self.train, Tensor) else \
                "e.g. train=(x_train, y_train)"
            raise ConfigError(f"task {self.name}: train is {type(self.train).__name__}; it must be a tuple of "
                              f"tensors sharing the first (sample) dimension, {hint}")
        for i, t in enumerate(self.train):
            if not isinstance(t, Tensor):
                how = ("convert it with torch.as_tensor(a) or torch.from_numpy(a)" if type(t).__module__ == "numpy"
                       else "convert it with torch.as_tensor")
                raise ConfigError(f"task {self.name}: train[{i}] is {type(t).__module__}.{type(t).__name__}, not a "
                                  f"torch.Tensor; {how}")
        object.__setattr__(self, "train", tuple(self.train))  # a list would be sliced as one
        if not self.train:
            raise ValueError(f"task {self.name}: no training tensors")
        n = self.train[0].shape[0]
        if any(t.shape[0] != n for t in self.train):
            raise ValueError(f"task {self.name}: training tensors disagree on the sample count")
        if n == 0:
            raise ValueError(f"task {self.name}: no training samples")

    @property
    def num_samples(self) -> int:
        return int(self.train[0].shape[0])

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """``evaluate(model)`` under no_grad as a dict of floats ({} without an evaluation);
        a BadTaskResult naming what it returned where that is not a dict of numbers (the peers'
        compute loop and the launcher's average both read it here)."""
        if self.evaluate is None:
            return {}
        with torch.no_grad():
            result = self.evaluate(model)
        if not isinstance(result, Mapping):
            raise BadTaskResult(f"the task's evaluate{defined_at(self.evaluate)} returned {type(result).__name__}; "
                                "it must return a dict of numbers, e.g. {'accuracy': 0.9}")
        metrics = {}
        for key, value in result.items():
            number = _number(value)
            if number is None:
                what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else \
                    f"{type(value).__name__} {value!r}"[:80]
                raise BadTaskResult(f"the task's evaluate{defined_at(self.evaluate)} returned {what} for "
                                    f"{key!r}; it must return a dict of numbers, e.g. {{'accuracy': 0.9}}")
            metrics[str(key)] = number
        return metrics


def _number(value: Any) -> float | None:
    """``value`` as a float: a number, a one-element tensor or a numpy scalar; None otherwise."""
    if isinstance(value, (Tensor, np.ndarray)):  # a one-element tensor or array: np.array(0.9), torch.tensor(0.9)
        return float(value) if value.size == 1 or (isinstance(value, Tensor) and value.numel() == 1) else None
    if isinstance(value, (Real, np.number)) and not isinstance(value, np.bool_):
        return float(value)
    return None


def defined_at(function: Callable[..., Any]) -> str:
    """`` (file:line)`` where a task's ``function`` is defined, "" where that is not known."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    return f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""


def seed_all(seed: int) -> None:
    """Seed torch, Python's ``random`` and ``numpy.random``: a task may draw its model's
    initialization (or its training draws) from any of them. The global generators are left so
    seeded, not restored: what draws from them next is the task's own code, which the seed is for."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_seeded(task: Task, seed: int) -> nn.Module:
    """``task.build_model()`` after :func:`seed_all`: peers started apart, on other hosts, and
    the tools that rebuild the model (the launcher's average, ``swarmnet eval``) all build the
    same initial model from one seed."""
    seed_all(seed)
    return task.build_model()


def import_factory(spec: str, form: str = "must be 'module:function', e.g. swarmnet.tasks.digits:task",
                   where: str = "the peer") -> Callable[..., Any]:
    """The callable ``module:function`` names; ConfigError (``form`` says what is expected,
    ``where`` what imports it) when it cannot be had."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"task {spec!r} {form}")
    with contextlib.suppress(OSError):  # a folder deleted under the process has no path
        here = os.getcwd()
        if here not in sys.path and "" not in sys.path:  # as `python -m swarmnet` (how `up` starts peers) has it
            sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + "."))  # not one the module imports
        hint = (f"; the module must be importable where {where} runs: install it, or add its folder to PYTHONPATH "
                "(the folder a command runs in counts too)") if missing else ""
        raise ConfigError(f"task {spec!r}: cannot import {module_name!r}: {exc}{hint}") from None
    except Exception as exc:  # the module itself fails: a syntax error, an error at import time
        raise ConfigError(f"task {spec!r}: importing {module_name!r} failed: {what_failed(exc)}") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"task {spec!r}: {module_name} has no callable {func_name!r}")
    return factory


def load_task(spec: str, options: Mapping[str, Any] | None = None) -> Task:
    """Import ``module:function`` and call it with ``options``. The task's ``build_model``
    raises a ConfigError naming the options when it fails (a negative width, say), where the
    model is built: in every peer, and in the tools that rebuild it."""
    options = dict(options or {})
    task = call_factory(spec, import_factory(spec), options)
    if not isinstance(task, Task):
        raise ConfigError(f"task {spec!r} returned {type(task).__name__}, expected swarmnet.tasks.Task")
    build = task.build_model

    def build_model() -> nn.Module:
        try:
            model = build()
        except Exception as exc:
            raise ConfigError(f"task {spec!r} with task.options {options}: building the model failed: "
                              f"{what_failed(exc)}; fix the task or its options") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {spec!r}: build_model returned {type(model).__name__}, expected a "
                              "torch.nn.Module; fix the task's build_model")
        return model
    return replace(task, build_model=build_model)


def call_factory(spec: str, factory: Callable[..., Any], options: Mapping[str, Any], *,
                 flag: str = "task.options", **fixed: Any) -> Any:
    """``factory(**fixed, **options)``; a ConfigError naming the option (given as ``flag``) when
    one is unknown, of the wrong type, or refused by the factory (the bundled tasks refuse a bad
    value with a ValueError), instead of a traceback from deep inside torch."""
    _check_option_types(spec, factory, options, flag)
    try:
        signature = inspect.signature(factory)
        signature.bind(**fixed, **options)
    except TypeError as exc:
        params = signature.parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and \
                (untaken := [f"{key}=" for key in fixed if key not in params]):
            raise ConfigError(f"task {spec!r}: swarmnet calls it with {', '.join(f'{key}=' for key in fixed)}, and "
                              f"its signature {signature} takes no {', '.join(untaken)}: point the spec at a "
                              "function that takes them") from None
        raise ConfigError(f"task {spec!r}: bad {flag} {dict(options)}: {exc}") from None
    except ValueError:  # a factory without an inspectable signature: the call will tell
        pass
    try:
        return factory(**fixed, **options)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"task {spec!r} with {flag} {dict(options)} failed: {what_failed(exc)}; "
                          "fix the task or its options") from None


def what_failed(exc: BaseException) -> str:
    """An exception in a user's code in one line: its type, message and where it was raised."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    if isinstance(exc, BadTaskResult):  # raised by swarmnet's check: its message names the task's function
        return f"{type(exc).__bases__[0].__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _check_option_types(spec: str, factory: Callable[..., Any], options: Mapping[str, Any], flag: str) -> None:
    """Each option of the type of the factory's default for it (a float option takes an int): a
    string where a width belongs would otherwise fail deep inside torch, or only in each peer."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a factory without an inspectable signature
        return
    for key, value in options.items():
        param = params.get(key)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            continue  # unknown keys fail at the call, with Python's own message
        kind = type(param.default)
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not fits and not (kind is float and type(value) is int):
            given = f"{flag} {key}={value!r}" if flag.startswith("--") else f"{flag}.{key} = {value!r}"
            raise ConfigError(f"task {spec!r}: {given} must be of type {kind.__name__} "
                              f"(its default is {param.default!r})")
