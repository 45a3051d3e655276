"""models.bundle.expr: the ``$`` expression grammar, interpreted without eval."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.bundle import expr

REFS: dict[str, Any] = {
    "a": 2, "b": 3, "name": "spleen", "root": "/b", "items": [1, 2, 3, 4], "d": {"k": "v"},
    "pre::transforms::0": "first", "flag": False,
}


def run(text: str, refs: dict[str, Any] | None = None) -> Any:
    values = REFS if refs is None else refs
    return expr.evaluate(expr.parse(text), lambda ref: values[ref])


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), ("-2.5", -2.5), ("'x'", "x"), ("True", True), ("None", None),
    ("[1, 'a', None]", [1, "a", None]), ("(1, 2)", (1, 2)), ("{'a': [1]}", {"a": [1]}), ("{1, 2}", {1, 2}),
    ("@a + @b", 5), ("@a * @b - 1", 5), ("@b / @a", 1.5), ("@b // @a", 1), ("@b % @a", 1), ("@a ** 3", 8),
    ("@root + '/models/model.pt'", "/b/models/model.pt"),
    ("1 < @a <= 2", True), ("1 < @a < 2", False), ("@a == 2 and @b != 2", True), ("not @flag", True),
    ("@name in ['spleen', 'liver']", True), ("@name not in ['liver']", True), ("@d is None", False),
    ("'cuda' if @flag else 'cpu'", "cpu"), ("@items[0]", 1), ("@items[-1]", 4), ("@items[1:3]", [2, 3]),
    ("@items[::2]", [1, 3]), ("@d['k']", "v"), ("@d.get('z', 0)", 0), ("list(@d.keys())", ["k"]),
    ("[x * 2 for x in @items if x > 2]", [6, 8]), ("[{'image': i} for i in @items[:2]]", [{"image": 1}, {"image": 2}]),
    ("[(i, j) for i in range(2) for j in range(i)]", [(1, 0)]), ("[k for k, v in @d.items()]", ["k"]),
    ("len(@items) + max(@items) + min(1, 2)", 9), ("sorted([3, 1, 2])", [1, 2, 3]), ("list(range(3))", [0, 1, 2]),
    ("sum(@items)", 10), ("'a/b'.split('/')", ["a", "b"]), ("'/'.join(['a', 'b'])", "a/b"),
    ("@pre#transforms#0", "first"), ("@pre::transforms::0", "first"), ("@flag or @a", 2), ("@flag and @nope", False),
])
def test_grammar(text: str, value: Any) -> None:
    assert run(text) == value


def test_references_are_found_with_either_separator() -> None:
    parsed = expr.parse("@network_def.to(@device) if @a#b else @a::b::0")
    assert sorted(parsed.refs.values()) == ["a::b", "a::b::0", "device", "network_def"]


def test_short_circuit_does_not_resolve_the_other_branch() -> None:
    asked: list[str] = []

    def resolve(ref: str) -> Any:
        asked.append(ref)
        return {"flag": False}[ref]

    assert expr.evaluate(expr.parse("@missing if @flag else 'cpu'"), resolve) == "cpu"
    assert asked == ["flag"]


def test_imports_are_recognised_not_run() -> None:
    assert expr.is_import("import glob") and expr.is_import(" from os import path")
    assert not expr.is_import("important + 1")


@pytest.mark.parametrize(("text", "message"), [
    ("import os", "not an expression"), ("x = 1", "not an expression"), ("@a; @b", "not an expression"),
    ("(yield 1)", "Yield is not allowed"), ("await x", "Await is not allowed"), ("{x for x in [1]}", "SetComp"),
    ("(x for x in [1])", "GeneratorExp"), ("{x: 1 for x in [1]}", "DictComp"), ("b'x'", "constant of type bytes"),
    ("...", "constant of type ellipsis"), ("[*@items]", "Starred"), ("print(1)", "name 'print'"),
    ("__builtins__", "name '__builtins__'"), ("_ref0_", "name '_ref0_'"), ("vars()", "name 'vars'"),
    ("globals()", "name 'globals'"), ("compile('1', 'f', 'eval')", "name 'compile'"), ("@a.real", "'real'"),
    ("torch.load('m.pt')", "'torch.load' is not allowed"), ("torch.jit.load('m.ts')", "'torch.jit.load'"),
    ("numpy.load('x.npy')", "'numpy.load' is not allowed"), ("np.loadtxt('x')", "'np.loadtxt' is not allowed"),
    ("monai.bundle.ConfigParser()", "'monai.bundle.ConfigParser' is not allowed"),
    ("[x for _x in [1]]", "comprehension target"), ("[x.__class__ for x in [1]]", "'__class__'"), ("@", "empty"),
    ("x" * 20_000, "longer than"),
])
def test_outside_the_grammar(text: str, message: str) -> None:
    with pytest.raises(expr.ExpressionError, match=message):
        expr.parse(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("@:#$%()[]{}'\".,_ab0x+*-/<=!~ \n\\")) , max_size=40))
def test_any_text_is_parsed_or_refused_cleanly(text: str) -> None:
    """Arbitrary input never escapes as anything but ExpressionError (the caller turns it into a key error)."""
    with contextlib.suppress(expr.ExpressionError):
        expr.parse(text)


def test_allowed_torch_and_numpy_names() -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    assert run("torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')").type in ("cuda", "cpu")
    assert run("torch.device('cpu')") == torch.device("cpu")
    assert run("numpy.float32") is np.float32 and run("np.float32") is np.float32
    assert run("torch.float16") is torch.float16
    net = torch.nn.Linear(1, 1)
    assert run("@net.to(@device)", {"net": net, "device": torch.device("cpu")}) is net


def test_calling_a_value_needs_an_allowed_object() -> None:
    """A reference may be called only if it is an allowed callable or an instance of an allowed class."""
    pytest.importorskip("monai")
    import torch

    assert run("@f('cpu')", {"f": torch.device}) == torch.device("cpu")
    with pytest.raises(expr.ExpressionError, match="calling builtin_function_or_method objects is not allowed"):
        run("@f('x')", {"f": print})
    with pytest.raises(expr.ExpressionError, match="calling function objects is not allowed"):
        run("@f('x')", {"f": lambda x: x})
    with pytest.raises(expr.ExpressionError, match="calling type objects is not allowed"):
        run("@f('x')", {"f": type})


def test_methods_only_on_their_kind_of_value() -> None:
    with pytest.raises(expr.ExpressionError, match="attribute 'get' is not allowed on str"):
        run("'a'.get('x')")
    with pytest.raises(expr.ExpressionError, match="attribute 'split' is not allowed on dict"):
        run("@d.split('/')")
    with pytest.raises(expr.ExpressionError, match="attribute 'join' is not allowed on list"):
        run("@items.join('')")
    pytest.importorskip("torch")
    with pytest.raises(expr.ExpressionError, match="attribute 'to' is not allowed on dict"):
        run("@d.to('cpu')")
