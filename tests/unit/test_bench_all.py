"""bench.all: one table from every benchmark's rows(); a module without rows(), or whose run fails, is a row."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from bench import all as bench_all
from bench.report import Row


def _module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    seen: dict[str, object] = {}

    def good(counts: tuple[int, ...] = (1,)) -> list[Row]:
        seen["counts"] = counts
        return [Row("good", 2.0, "inst/s", "ref", 1.0, 1.5)]

    def fails(slices: int = 1) -> list[Row]:
        raise RuntimeError("Orthanc did not start")

    _module(monkeypatch, "fake_good", rows=good)
    _module(monkeypatch, "fake_fails", rows=fails)
    _module(monkeypatch, "fake_without")
    monkeypatch.setattr(bench_all, "BENCHMARKS", (
        ("good", ("fake_missing", "fake_good")),  # the first module that exists and has rows()
        ("without", ("fake_without",)),
        ("fails", ("fake_fails",)),
        ("absent", ("fake_missing",)),
    ))
    return seen


def test_every_benchmark_gives_rows_or_a_row_saying_why_not(fakes: dict[str, object]) -> None:
    rows = bench_all.run(["good", "without", "fails", "absent"], {"counts": (300,), "slices": 300})
    assert [r.measure for r in rows] == ["good", "without: no figure", "fails: no figure", "absent: no figure"]
    assert fakes["counts"] == (300,)  # only the options its signature names are passed
    assert rows[0].met is True
    assert all(math.isnan(r.value) and r.met is None for r in rows[1:])
    assert "has no rows() yet" in rows[1].note
    assert "RuntimeError: Orthanc did not start" in rows[2].note
    assert "none of fake_missing exists" in rows[3].note


def test_only_runs_the_named_ones_and_the_table_goes_to_out(fakes: dict[str, object], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.txt"
    bench_all.main(["--only", "good", "--counts", "300,3000", "--out", str(out)])
    text = out.read_text()
    assert "good" in text and "no figure" not in text and fakes["counts"] == (300, 3000)
    assert text.strip() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_all.main(["--only", "nonsense"])
