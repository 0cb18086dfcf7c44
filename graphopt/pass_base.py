"""The one pass contract, and adapters that let torch.fx and onnx_ir passes register as they are.

A pass is a class with a ``name``, the ``kind_in`` it accepts and the ``kind_out`` it
returns (export is the pass whose kinds differ), whether it is ``exact`` (with a declared
``tolerance`` on the max absolute output difference) or lossy, and typed ``Options``: a
frozen dataclass whose fields carry defaults. ``call(program) -> PassResult`` does the
work; ``__call__`` wraps it with the kind check, ``requires``/``ensures`` and error
wrapping, in the manner of ``onnx_ir.passes.PassBase``.

Example::

    @dataclasses.dataclass(frozen=True)
    class Options:
        opset: int = 21

    class OnnxExportPass(Pass):
        name = "export"
        kind_in, kind_out = "module", "onnx"
        Options = Options

        def call(self, program: Program) -> PassResult:
            ...
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import types
import typing
from typing import Any, ClassVar, Literal, Mapping, Union, get_args, get_origin

import onnx_ir as ir
import onnx_ir.passes
import torch.fx
from torch.fx.passes.infra import pass_base as fx_pass_base

from graphopt.errors import GraphoptError, PassError, PreconditionError
from graphopt.program import Kind, Program

__all__ = ["Pass", "PassResult", "NoOptions", "FxPassAdapter", "OnnxIrPassAdapter",
           "adapt_pass", "coerce_options", "describe_options"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclasses.dataclass(frozen=True)
class PassResult:
    """The program after a pass, and whether the pass changed anything."""

    program: Program
    modified: bool
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Pass(abc.ABC):
    """Base of every graphopt pass. Subclasses set the class attributes and ``call``."""

    name: ClassVar[str]
    kind_in: ClassVar[Kind]
    kind_out: ClassVar[Kind]
    exact: ClassVar[bool] = True
    #: Largest max-abs output difference an exact pass may cause against the program before it.
    tolerance: ClassVar[float | None] = 1e-6
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, /, **overrides: Any) -> None:
        if options is None:
            options = coerce_options(type(self).Options, overrides, where=f"pass {self.name!r}")
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        if not isinstance(options, type(self).Options):
            raise TypeError(f"pass {self.name!r} takes {type(self).Options.__name__}, "
                            f"got {type(options).__name__}")
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def requires(self, program: Program) -> None:
        """Raises ``PreconditionError`` if ``program`` is not what this pass accepts."""

    def ensures(self, program: Program) -> None:
        """Raises ``PassError`` if the pass's own postcondition does not hold."""

    @abc.abstractmethod
    def call(self, program: Program) -> PassResult:
        """Rewrites ``program`` (in place or not) and returns the result."""

    def __call__(self, program: Program) -> PassResult:
        if program.kind != self.kind_in:
            raise PreconditionError(
                f"pass {self.name!r} takes a program of kind {self.kind_in!r}, got {program.kind!r}"
                + (": it needs the module side, so it must come before 'export' and cannot run on "
                   "an ONNX file" if self.kind_in == "module" else ": put it after 'export'"))
        self.requires(program)
        try:
            result = self.call(program)
        except GraphoptError:
            raise
        except Exception as error:
            raise PassError(f"pass {self.name!r} failed: {type(error).__name__}: {error}") from error
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        if result.program.kind != self.kind_out:
            raise PassError(f"pass {self.name!r} declares kind_out {self.kind_out!r} but returned "
                            f"a program of kind {result.program.kind!r}")
        self.ensures(result.program)
        return result


class FxPassAdapter(Pass):
    """Runs an existing ``torch.fx.passes.infra.pass_base.PassBase`` on a module program."""

    kind_in = "module"
    kind_out = "module"
    wrapped: ClassVar[type[fx_pass_base.PassBase]]

    def call(self, program: Program) -> PassResult:
        if not isinstance(program.ir, torch.fx.GraphModule):
            raise PreconditionError(
                f"pass {self.name!r} is a torch.fx pass and needs a symbolically traced module; "
                f"this model did not trace ({program.info.get('trace', {}).get('reason', 'eager')})")
        result = self.wrapped()(program.ir)
        if result is None:  # fx passes may return None when they change nothing
            return PassResult(program, False)
        program.ir = result.graph_module
        return PassResult(program, bool(result.modified))


class OnnxIrPassAdapter(Pass):
    """Runs an existing ``onnx_ir.passes.PassBase`` on an ONNX program."""

    kind_in = "onnx"
    kind_out = "onnx"
    wrapped: ClassVar[type[onnx_ir.passes.PassBase]]

    def call(self, program: Program) -> PassResult:
        result = self.wrapped()(program.ir)
        program.ir = result.model
        return PassResult(program, bool(result.modified))


def adapt_pass(name: str, obj: Any) -> type[Pass]:
    """Returns a graphopt ``Pass`` class for ``obj``: itself, or an adapter around an fx/onnx_ir pass."""
    if isinstance(obj, type) and issubclass(obj, Pass):
        if getattr(obj, "name", None) != name:
            raise TypeError(f"entry point {name!r} names a pass whose name is {getattr(obj, 'name', None)!r}")
        return obj
    for base, adapter in ((fx_pass_base.PassBase, FxPassAdapter), (onnx_ir.passes.PassBase, OnnxIrPassAdapter)):
        if isinstance(obj, type) and issubclass(obj, base):
            doc = (obj.__doc__ or "").strip().splitlines()
            return type(obj.__name__ + "Adapter", (adapter,), {
                "name": name, "wrapped": obj, "__doc__": doc[0] if doc else obj.__name__,
                "__module__": obj.__module__})
    raise TypeError(f"{obj!r} is not a graphopt Pass, a torch.fx PassBase or an onnx_ir PassBase")


def describe_options(options_cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) for each option field, for ``graphopt passes`` and the docs."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, _type_name(hints[f.name]), default))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce_options(options_cls: type, values: Mapping[str, Any], *, where: str) -> Any:
    """Builds ``options_cls`` from plain values (a recipe table), checking names and types.

    Raises:
        ValueError: naming ``where``, the option, the nearest valid name or the expected type.
    """
    import difflib

    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            near = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else (
                f"; valid options: {', '.join(sorted(fields))}" if fields else "; it takes no options")
            raise ValueError(f"{where}: unknown option {key!r}{hint}")
        checked[key] = _check_type(value, hints[key], f"{where}: option {key!r}")
    try:
        return options_cls(**checked)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{where} must be None")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_check_type(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a table, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where} must be {tp.__name__}, got bool {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"{where} is out of range: {value}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
