"""The ``$`` expression language of bundle configs, parsed with :mod:`ast` and interpreted here (never ``eval``).

Accepted: literals (numbers, strings, ``True``/``False``/``None``, lists, tuples, dicts, sets), ``@id``
references (``$@a + @b``, ``$@network_def.to(@device)``, ``@a::b`` or the old ``@a#b``), allow-listed dotted
names and calls (``torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')``, ``numpy.float32``,
``monai.networks.nets.resnet.resnet50(...)``), allow-listed methods on values (``.to``, the RetinaNet
detector's setters...), pure builtins (``list``, ``len``, ``range``...), subscripts and slices, arithmetic,
comparison and boolean operators, conditional expressions and list comprehensions (``[{'image': i} for i in
@datalist]``). Everything else (imports, lambdas, ``_``/dunder names and attributes, ``eval``, ``open``,
``getattr``, f-strings, ``**`` unpacking, walrus...) is refused by :func:`parse` before anything runs.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.bundle import allow

REF_SEP = "::"
#: ``@id`` inside a value, after ``#`` was normalised to ``::`` (MONAI's own pattern).
REF_PATTERN = re.compile(r"@(?:\w*)(?:::\w*)*")
_IMPORT = re.compile(r"^\s*(?:import|from)\s")
_MAX_LENGTH = 10_000
_MAX_SIZE = 1_000_000

_BINOPS: Mapping[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: Mapping[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_,
}
_COMPARE: Mapping[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Store, ast.Attribute, ast.Call, ast.keyword,
    ast.IfExp, ast.BoolOp, ast.And, ast.Or, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Subscript, ast.Slice,
    ast.List, ast.Tuple, ast.Dict, ast.Set, ast.ListComp, ast.comprehension,
    *_BINOPS, *_UNARY, *_COMPARE,
)


class ExpressionError(ValueError):
    """The expression is outside the grammar or names something not allowed (the caller adds the key)."""


def is_import(text: str) -> bool:
    """``$import glob`` / ``$from x import y``: never executed, the resolver yields None for them."""
    return bool(_IMPORT.match(text))


@dataclass(frozen=True)
class Expression:
    """A parsed, checked ``$`` expression; ``refs`` maps placeholder names to the ``::`` ids referenced."""

    source: str
    tree: ast.Expression
    refs: Mapping[str, str]


def normalize_id(text: str) -> str:
    """The old ``#`` separator is ``::`` (as MONAI does, also inside strings)."""
    return text.replace("#", REF_SEP)


def parse(text: str) -> Expression:
    """Parse ``text`` (without the leading ``$``) and check it against the grammar; raise :class:`ExpressionError`."""
    if len(text) > _MAX_LENGTH:
        raise ExpressionError(f"expression longer than {_MAX_LENGTH} characters")
    text = normalize_id(text)
    refs: dict[str, str] = {}

    def placeholder(match: re.Match[str]) -> str:
        ref = match.group(0)[1:]
        if not ref:
            raise ExpressionError("empty reference '@'")
        name = f"_ref{len(refs)}_"
        refs[name] = ref
        return name

    # longest first, as MONAI does, so "@a::b" is not read as "@a" followed by "::b"
    code = REF_PATTERN.sub(placeholder, text)
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not an expression: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("expression nested too deeply") from None
    _check(tree, refs, set())
    return Expression(text, tree, refs)


def _dotted(node: ast.AST) -> str | None:
    """``torch.cuda.is_available`` for a chain of attributes on a module root, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in allow.MODULE_ROOTS:
        return ".".join([node.id, *reversed(parts)])
    return None


def _check(node: ast.AST, refs: Mapping[str, str], local: set[str]) -> None:
    if not isinstance(node, _NODES):
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")
    if isinstance(node, ast.Name):
        if node.id in refs or node.id in local or node.id in allow.BUILTINS:
            return
        if node.id in allow.MODULE_ROOTS:
            raise ExpressionError(f"module {node.id!r} cannot be used as a value")
        raise ExpressionError(f"name {node.id!r} is not allowed")
    if isinstance(node, ast.Attribute):
        dotted = _dotted(node)
        if dotted is not None:
            if not allow.is_allowed_dotted(dotted):
                raise ExpressionError(f"{dotted!r} is not allowed")
            return
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id not in refs and root.id not in local and (
                root.id not in allow.BUILTINS):
            raise ExpressionError(f"name {root.id!r} is not allowed ({ast.unparse(node)!r})")
        _check(node.value, refs, local)  # inner first: the message names the first offence
        if node.attr.startswith("_") or node.attr not in allow.METHODS:
            raise ExpressionError(f"attribute {node.attr!r} is not allowed")
        return
    if isinstance(node, ast.Call) and any(k.arg is None for k in node.keywords):
        raise ExpressionError("'**' unpacking is not allowed")
    if isinstance(node, ast.Dict) and any(k is None for k in node.keys):
        raise ExpressionError("'**' unpacking is not allowed")
    if isinstance(node, ast.Constant) and not isinstance(node.value, str | int | float | bool | type(None)):
        raise ExpressionError(f"constant of type {type(node.value).__name__} is not allowed")
    if isinstance(node, ast.ListComp):
        names = set(local)
        for gen in node.generators:
            if gen.is_async:
                raise ExpressionError("async comprehension is not allowed")
            _check(gen.iter, refs, names)
            names |= _targets(gen.target)
            for cond in gen.ifs:
                _check(cond, refs, names)
        _check(node.elt, refs, names)
        return
    for child in ast.iter_child_nodes(node):
        _check(child, refs, local)


def _targets(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Name) and not node.id.startswith("_"):
        return {node.id}
    if isinstance(node, ast.Tuple | ast.List):
        return set().union(*(_targets(e) for e in node.elts))
    raise ExpressionError("a comprehension target must be plain names")


def _bind(node: ast.AST, value: Any, scope: dict[str, Any]) -> None:
    if isinstance(node, ast.Name):
        scope[node.id] = value
        return
    assert isinstance(node, ast.Tuple | ast.List)
    items = list(value)
    if len(items) != len(node.elts):
        raise ExpressionError(f"cannot unpack {len(items)} values into {len(node.elts)} names")
    for target, item in zip(node.elts, items, strict=True):
        _bind(target, item, scope)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple) else 1


def evaluate(expr: Expression, resolve: Callable[[str], Any]) -> Any:
    """The value of a checked :class:`Expression`; ``resolve(id)`` returns the built object of a reference."""
    return _Interpreter(resolve, expr.refs)._eval(expr.tree.body, {})


class _Interpreter:
    def __init__(self, resolve: Callable[[str], Any], refs: Mapping[str, str]) -> None:
        self._resolve = resolve
        self._refs = refs

    def _eval(self, node: ast.AST, scope: dict[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in scope:
                return scope[node.id]
            if node.id in self._refs:
                return self._resolve(self._refs[node.id])
            return allow.BUILTINS[node.id]
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is not None:
                return allow.load_dotted(dotted)
            value = self._eval(node.value, scope)
            if not allow.method_allowed(value, node.attr):
                raise ExpressionError(f"attribute {node.attr!r} is not allowed on {type(value).__name__}")
            return getattr(value, node.attr)
        if isinstance(node, ast.Call):
            func = self._eval(node.func, scope)
            vetted = isinstance(node.func, ast.Attribute) or (
                isinstance(node.func, ast.Name) and node.func.id in allow.BUILTINS and node.func.id not in scope)
            if not vetted and not allow.may_call(func):
                raise ExpressionError(f"calling {type(func).__name__} objects is not allowed")
            args = []
            for arg in node.args:
                if isinstance(arg, ast.Starred):
                    raise ExpressionError("'*' unpacking is not allowed")
                args.append(self._eval(arg, scope))
            kwargs = {k.arg: self._eval(k.value, scope) for k in node.keywords if k.arg is not None}
            return func(*args, **kwargs)
        if isinstance(node, ast.IfExp):
            return self._eval(node.body if self._eval(node.test, scope) else node.orelse, scope)
        if isinstance(node, ast.BoolOp):
            result: Any = None
            for value in node.values:
                result = self._eval(value, scope)
                if (isinstance(node.op, ast.And) and not result) or (isinstance(node.op, ast.Or) and result):
                    return result
            return result
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, scope), self._eval(node.right, scope)
            _limit(node.op, left, right)
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, scope))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, scope)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, scope)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Subscript):
            return self._eval(node.value, scope)[self._eval(node.slice, scope)]
        if isinstance(node, ast.Slice):
            parts = (node.lower, node.upper, node.step)
            return slice(*(None if p is None else self._eval(p, scope) for p in parts))
        if isinstance(node, ast.List):
            return [self._eval(e, scope) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(e, scope) for e in node.elts)
        if isinstance(node, ast.Set):
            return {self._eval(e, scope) for e in node.elts}
        if isinstance(node, ast.Dict):
            return {self._eval(k, scope): self._eval(v, scope) for k, v in zip(node.keys, node.values, strict=True)
                    if k is not None}
        if isinstance(node, ast.ListComp):
            return self._comprehension(node, 0, dict(scope), [])
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")  # pragma: no cover

    def _comprehension(self, node: ast.ListComp, index: int, scope: dict[str, Any], out: list[Any]) -> list[Any]:
        if index == len(node.generators):
            out.append(self._eval(node.elt, scope))
            if len(out) > _MAX_SIZE:
                raise ExpressionError("comprehension too long")
            return out
        gen = node.generators[index]
        for item in self._eval(gen.iter, scope):
            inner = dict(scope)
            _bind(gen.target, item, inner)
            if all(self._eval(cond, inner) for cond in gen.ifs):
                self._comprehension(node, index + 1, inner, out)
        return out


def _limit(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse operations that would take unbounded time or memory (``9**9**9``, ``'a' * 10**12``)."""
    if isinstance(op, ast.Pow) and isinstance(right, int) and abs(right) > 256 and not (
            isinstance(left, int | float) and abs(left) <= 1):
        raise ExpressionError("exponent too large")
    if isinstance(op, ast.Mult):
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int) and _size(seq) * n > _MAX_SIZE:
                raise ExpressionError("sequence too long")
