"""Rewards of online RL (``--algo grpo|rloo``), as TRL reward functions.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns)``
with the dataset's other columns as keyword arguments (one value per completion) and wants one
float per completion (``None``: this reward does not apply to that completion). Three kinds:

- a **verifier** (``--reward exact|regex|last_number|contains``): 1.0 when the completion
  matches the row's reference column under ``omotool.eval.generation.is_correct`` (the code
  ``omotool eval generate`` scores with), else 0.0;
- a **Python function** (``--reward path/to/file.py:name`` or ``package.module:name``) with
  TRL's signature, plain or ``async def`` (TRL awaits those on its event loop, concurrently);
- a **reward model** (``--reward-model DIR``): a one-output sequence classifier scored by
  ``omotool.eval.reward_model.rewards`` (the code of ``omotool eval --reward-model``).

Every reward is wrapped in ``CheckedReward`` (``AsyncCheckedReward`` for an async one): an
exception, a wrong count, a value that is not a number, NaN or ±inf stop the run with a
``RewardError`` naming the reward (and the prompt), where TRL would average NaN away or fail
deep inside its trainer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omotool.errors import InputError, UsageError
from omotool.eval.generation import EXTRACTORS, check_extract, is_correct

VERIFIERS = EXTRACTORS  # exact, regex, last_number, contains
# The keyword arguments TRL passes besides the dataset's columns.
TRL_ARGUMENTS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
     "environments"}
)  # fmt: skip


class RewardError(InputError):
    """A reward function that failed or returned what cannot be a reward."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a run: ``kind`` is ``verifier``, ``function`` or ``model``."""

    kind: str
    source: str  # the verifier's name, "file.py:name" / "module:name", or the model folder

    @property
    def option(self) -> str:
        flag = "--reward-model" if self.kind == "model" else "--reward"
        return f"{flag} {self.source}"


def parse_rewards(rewards: Sequence[str], reward_models: Sequence[str] = ()) -> list[RewardSpec]:
    """The rewards in order: each ``--reward`` as given, then each ``--reward-model``."""
    specs = []
    for source in rewards:
        if source in VERIFIERS:
            specs.append(RewardSpec("verifier", source))
        elif ":" in source.strip(":") and source.rpartition(":")[2].isidentifier():
            specs.append(RewardSpec("function", source))
        else:
            raise UsageError(
                f"--reward {source!r}: give a verifier ({', '.join(VERIFIERS)}), a Python "
                "function as path/to/file.py:name or package.module:name, or use --reward-model "
                "for a reward model folder."
            )
    return specs + [RewardSpec("model", folder) for folder in reward_models]


def load_function(source: str) -> Callable[..., Any]:
    """The callable ``name`` of ``path/to/file.py:name`` or ``package.module:name``."""
    location, _, name = source.rpartition(":")
    try:
        if location.endswith(".py") or "/" in location or "\\" in location:
            path = Path(location)
            if not path.is_file():
                raise InputError(f"--reward {source}: no file {path}.")
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            module_name = f"omotool_reward_{digest}"  # the same in every process
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise InputError(f"--reward {source}: {path} cannot be imported as Python.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
    except InputError:
        raise
    except Exception as error:  # any error of the user's module while it is imported
        raise InputError(
            f"--reward {source}: importing {location} failed ({type(error).__name__}: {error})."
        ) from error
    function = getattr(module, name, None)
    if function is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(
            f"--reward {source}: {location} has no {name!r} (it defines: "
            f"{', '.join(found) or 'no functions'})."
        )
    if not callable(function):
        raise InputError(f"--reward {source}: {name} is a {type(function).__name__}, not callable.")
    return function


def function_columns(function: Callable[..., Any]) -> list[str]:
    """The dataset columns ``function`` requires: its parameters without a default that are
    not TRL's own arguments."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in TRL_ARGUMENTS
    ]


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of a conversational completion's
    messages (``[{"role": "assistant", "content": ...}]``)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def verifier(extract: str, reference: str, pattern: str | None = None) -> Callable[..., Any]:
    """The reward 1.0/0.0: does each completion match its row's ``reference`` column under
    ``is_correct(completion, reference, extract, pattern)``."""
    check_extract(extract, pattern)

    def score(completions: Sequence[Any], **columns: Any) -> list[float]:
        references = columns[reference]
        scores = []
        for completion, wanted in zip(completions, references, strict=True):
            if isinstance(wanted, bool) or not isinstance(wanted, (str, numbers.Number)):
                raise TypeError(
                    f"the {reference!r} column holds {type(wanted).__name__}; "
                    "a verifier compares with a string or a number"
                )
            answer = completion_text(completion)
            scores.append(float(is_correct(answer, str(wanted), extract, pattern)))
        return scores

    return score


def reward_model_function(model: Any, tokenizer: Any, batch_size: int = 8) -> Callable[..., Any]:
    """A TRL reward function scoring each (prompt, completion) with the reward model, exactly
    as ``omotool eval --reward-model`` does (``omotool.eval.reward_model.rewards``)."""
    from omotool.eval.reward_model import rewards

    def score(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        answers = [completion_text(c) for c in completions]
        return rewards(model, tokenizer, list(prompts), answers, batch_size=batch_size)

    return score


class CheckedReward:
    """A reward function that stops the run with a ``RewardError`` (naming the reward and, for
    a raise or a bad value, the prompt) instead of passing a failure on to TRL.

    Refused: an exception, a count other than one per completion, a value that is neither a
    number nor ``None`` (TRL's "does not apply"), NaN and ±inf.
    """

    def __init__(
        self,
        name: str,
        option: str,
        function: Callable[..., Any],
        columns: Sequence[str] = (),
    ) -> None:
        self.__name__ = name  # TRL names the reward's metrics after it: rewards/<name>/mean
        self.option = option  # how the user named it: "--reward exact"
        self.function = function
        self.columns = tuple(columns)  # the dataset columns it reads

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> Any:
        try:
            values = self.function(prompts=prompts, completions=completions, **kwargs)
            if inspect.iscoroutine(values):  # an async function behind a plain one (a decorator)
                values = asyncio.run(values)
        except RewardError:
            raise
        except Exception as error:
            raise self._raised(error, self._failing_prompt(prompts, completions, kwargs)) from error
        return self.checked(values, prompts, completions)

    def _raised(self, error: Exception, prompt: Any) -> RewardError:
        return RewardError(
            f"reward {self.option} raised {type(error).__name__}: {error} (prompt: "
            f"{_shown(prompt)})."
        )

    def checked(
        self, values: Any, prompts: Sequence[Any], completions: Sequence[Any]
    ) -> list[float | None]:
        """``values`` as one float (or None) per completion, or a ``RewardError``."""
        try:
            values = list(values)
        except TypeError:
            raise RewardError(
                f"reward {self.option} returned {type(values).__name__}; it must return a list "
                "of numbers, one per completion."
            ) from None
        if len(values) != len(completions):
            raise RewardError(
                f"reward {self.option} returned {len(values)} values for {len(completions)} "
                "completions; it must return one per completion."
            )
        checked: list[float | None] = []
        for prompt, value in zip(prompts, values, strict=True):
            if value is None:
                checked.append(None)
                continue
            number = _number(value)
            if number is None or not math.isfinite(number):
                raise RewardError(
                    f"reward {self.option} returned {value!r} for the prompt {_shown(prompt)}; "
                    "rewards must be finite numbers (or None where a reward does not apply)."
                )
            checked.append(number)
        return checked

    def _failing_prompt(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """The first prompt whose completion alone makes the function raise (else the first)."""
        for index, prompt in enumerate(prompts):
            single = _one_completion(kwargs, index, len(prompts))
            try:
                values = self.function(prompts=[prompt], completions=[completions[index]], **single)
                if inspect.iscoroutine(values):
                    asyncio.run(values)
            except Exception:
                return prompt
        return prompts[0] if prompts else ""


class AsyncCheckedReward(CheckedReward):
    """``CheckedReward`` of an ``async def`` reward: TRL awaits it (``async def __call__``) on
    its event loop, alongside the other async rewards."""

    async def __call__(  # type: ignore[override]
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> Any:
        try:
            values = await self.function(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as error:
            at = await self._failing_prompt_async(prompts, completions, kwargs)
            raise self._raised(error, at) from error
        return self.checked(values, prompts, completions)

    async def _failing_prompt_async(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """The first prompt whose completion alone makes the function raise (else the first)."""
        for index, prompt in enumerate(prompts):
            try:
                await self.function(
                    prompts=[prompt], completions=[completions[index]],
                    **_one_completion(kwargs, index, len(prompts)),
                )  # fmt: skip
            except Exception:
                return prompt
        return prompts[0] if prompts else ""


def is_async(function: Callable[..., Any]) -> bool:
    """Whether calling ``function`` returns a coroutine: an ``async def`` function, a
    ``functools.partial`` of one, or an object with an ``async def __call__`` (as TRL's
    ``is_async_callable`` reads it)."""
    while isinstance(function, functools.partial):
        function = function.func
    call = type(function).__call__ if not inspect.isroutine(function) else None
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _one_completion(kwargs: Mapping[str, Any], index: int, count: int) -> dict[str, Any]:
    """TRL's keyword arguments for completion ``index`` alone."""
    return {
        key: [value[index]] if _per_completion(value, count) else value
        for key, value in kwargs.items()
    }


def _per_completion(value: Any, count: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def _shown(prompt: Any, limit: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else completion_text(prompt)
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered (``exact``, ``exact_2``): TRL's metrics are per name."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def spec_name(spec: RewardSpec, function: Callable[..., Any] | None = None) -> str:
    """The name TRL logs a reward under: the verifier, the function's name, the folder's."""
    if spec.kind == "verifier":
        return spec.source
    if spec.kind == "function":
        return getattr(function, "__name__", None) or spec.source.rpartition(":")[2]
    return Path(spec.source.rstrip("/\\")).name or "reward_model"


def load_reward(
    spec: RewardSpec,
    reference: str = "reference",
    pattern: str | None = None,
    placement: Any = None,
) -> CheckedReward:
    """``spec`` as a checked TRL reward function. A verifier reads the ``reference`` column
    (``pattern``: the regex verifier's); a reward model is loaded with ``placement``
    (``omotool.eval.device.Placement``; the CPU in float32 when None) and refused unless it
    is a one-output classifier."""
    columns: tuple[str, ...] = ()
    if spec.kind == "verifier":
        function = verifier(spec.source, reference, pattern)
        columns = (reference,)
    elif spec.kind == "function":
        function = load_function(spec.source)
        columns = tuple(function_columns(function))
    else:
        from omotool.eval.reward_model import load_reward_model

        model, tokenizer = load_reward_model(spec.source, placement)
        model.eval()
        function = reward_model_function(model, tokenizer)
    checked = AsyncCheckedReward if is_async(function) else CheckedReward
    return checked(spec_name(spec, function), spec.option, function, columns)


def required_columns(rewards: Sequence[CheckedReward]) -> dict[str, str]:
    """Each dataset column the rewards read → the option of the first reward reading it."""
    columns: dict[str, str] = {}
    for reward in rewards:
        for column in reward.columns:
            columns.setdefault(column, reward.option)
    return columns


def name_uniquely(rewards: Sequence[CheckedReward]) -> None:
    """Number repeated names in place (``exact``, ``exact_2``): TRL's metrics are per name."""
    for reward, name in zip(rewards, unique_names([r.__name__ for r in rewards]), strict=True):
        reward.__name__ = name
