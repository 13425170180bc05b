"""Pass infrastructure: every pass returns a frozen PassResult; Sequential runs a named list of them.

Contract (after onnx-ir's pass infrastructure): a pass never mutates the model it is given; it returns
``PassResult(model, modified, stats)`` where ``stats`` is the pass's own frozen data (a plan, a count).
An *analysis* (``kind = "analysis"``) returns the model unchanged and only data. A pass that needs an
earlier pass's data names it in ``requires``; Sequential hands it over as a keyword argument (the name
with ``_`` for ``-``), so each analysis runs once per pipeline. A failure inside a pass is re-raised as
``PassError("<name> failed[ after <previous passes>]: ...")``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import onnx

from preserve_onnx.errors import PassError, PreserveError, UsageError


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, and the pass's data."""

    model: onnx.ModelProto
    modified: bool
    stats: Any = None


class Pass(abc.ABC):
    """Base class. Subclasses set ``name`` (kebab-case), ``summary`` (one line) and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "transform"  # "transform", "analysis" (data only) or "check"
    requires: ClassVar[tuple[str, ...]] = ()  # earlier passes whose stats ``run`` takes as keywords

    @abc.abstractmethod
    def run(self, model: onnx.ModelProto, **inputs: Any) -> PassResult:
        """Return the pass's result; never mutate ``model``."""

    def __call__(self, model: onnx.ModelProto, **inputs: Any) -> PassResult:
        result = self.run(model, **inputs)
        # A pass that returns anything else breaks every caller that reads .model/.modified.
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        # A pass that claims "unchanged" but hands back another object hides a modification.
        if not result.modified and result.model is not model:
            raise TypeError(f"pass {self.name} returned a new model but modified=False")
        return result


@dataclass(frozen=True)
class SequentialResult:
    """The outcome of a pipeline: final model, whether any pass changed it, and each pass's result."""

    model: onnx.ModelProto
    modified: bool
    results: tuple[tuple[str, PassResult], ...]

    def stats(self, name: str) -> Any:
        """The stats of the pass called ``name`` (None if it did not run)."""
        for pass_name, result in self.results:
            if pass_name == name:
                return result.stats
        return None


class Sequential:
    """Runs passes in order, skipping the disabled ones; failures name the pass and its predecessors."""

    def __init__(self, passes: Sequence[Pass], disabled: Sequence[str] = (), known: Sequence[str] = ()):
        """``known``: every pass name a user may disable (a registry); names of it that this pipeline
        does not hold are skipped quietly (``strip-prefetches`` runs only with --replan). The one place
        ``--disable`` is checked."""
        names = [p.name for p in passes]
        known = list(dict.fromkeys([*known, *names]))
        unknown = [d for d in disabled if d not in known]
        if unknown:
            raise UsageError(f"--disable: unknown pass '{unknown[0]}' (passes: {', '.join(known)})")
        for p in passes:
            if p.name in disabled and p.kind == "analysis":
                # The passes after it need its data: skipping an analysis cannot work.
                users = [q.name for q in passes if p.name in q.requires]
                raise UsageError(
                    f"--disable: '{p.name}' is an analysis that {', '.join(users) or 'nothing'} "
                    f"needs, not a step to skip"
                )
        self.passes = [p for p in passes if p.name not in set(disabled)]

    def __call__(self, model: onnx.ModelProto) -> SequentialResult:
        results: list[tuple[str, PassResult]] = []
        modified = False
        for p in self.passes:
            made = {name: result.stats for name, result in results}
            inputs = {need.replace("-", "_"): made[need] for need in p.requires if need in made}
            try:
                result = p(model, **inputs)
            except PreserveError as exc:
                before = f" after {', '.join(name for name, _ in results)}" if results else ""
                raise PassError(f"{p.name} failed{before}: {exc}") from exc
            results.append((p.name, result))
            model = result.model
            modified = modified or result.modified
        return SequentialResult(model, modified, tuple(results))
