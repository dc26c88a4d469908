"""`omnistage profile stop|report` output and errors, and ProfileReport over the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

import omnistage.client
from omnistage import cli
from omnistage.convert import report_from_pb, report_to_pb
from omnistage.types import ProfileReport, ProfileSlimming, StageProfileResult
from tests.unit.trace_factory import Session, copy_session, shared_session

SLIMMING = ProfileSlimming(
    bytes_before=9_000_000,
    bytes_after=6_000_000,
    events_before=120_000,
    events_after=80_000,
    traces=3,
    copies_written=2,
)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


@pytest.fixture()
def fresh(session: Session, tmp_path: Path) -> Session:
    fresh = copy_session(session, tmp_path / session.dir.name)
    fresh.write_report()
    return fresh


def _report(slimming: ProfileSlimming | None) -> ProfileReport:
    stage = StageProfileResult(stage="thinker", replica="127.0.0.1:1", ok=True, local_dir="d")
    return ProfileReport("s1", "/out/s1", (stage,), "t.json.gz", "summary.md", slimming)


@pytest.mark.parametrize("slimming", [SLIMMING, ProfileSlimming(), None])
def test_the_report_crosses_the_wire_with_its_slimming(slimming: ProfileSlimming | None) -> None:
    report = _report(slimming)
    wire = report_to_pb(report)
    assert wire.HasField("slimming") == (slimming is not None)
    assert report_from_pb(type(wire).FromString(wire.SerializeToString())) == report


def test_report_prints_the_bytes_saved(fresh: Session, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profile", "report", str(fresh.dir), "--slim"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("slimming: "))
    saved = int(line.split()[1].replace(",", ""))
    assert saved > 0 and "size ratio 0." in line and "events dropped" in line
    assert f"**{saved:,} bytes saved**" in (fresh.dir / "summary.md").read_text()
    # without --slim, nothing about slimming
    assert cli.main(["profile", "report", str(fresh.dir)]) == 0
    assert "slimming" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "nan", "fast"])
def test_a_bad_slim_threshold_is_refused_plainly(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["report", str(tmp_path)], ["stop"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["profile", *command, f"--slim-min-us={value}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--slim-min-us" in err and "Traceback" not in err
        assert "≥ 0" in err or "number of microseconds" in err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"spans": [{"stage": "a"}]}), "spans[0] is malformed"),
    ],
)
def test_a_malformed_report_json_is_an_error_not_a_traceback(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "report.json").write_text(text)
    assert cli.main(["profile", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnistage: cannot rebuild the report of") and problem in err
    assert "Traceback" not in err


class FakeClient:
    reports: ClassVar[list[ProfileReport]] = []

    def __init__(self, address: str, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stop_profile(self, output_dir: str = "", **kwargs: Any) -> ProfileReport:
        return self.reports.pop(0)


def test_stop_prints_what_slimming_saved(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(omnistage.client, "Client", FakeClient)
    FakeClient.reports = [_report(SLIMMING), _report(ProfileSlimming(100, 100, 10, 10, 1, 0))]
    assert cli.main(["profile", "stop", "--slim"]) == 0
    out = capsys.readouterr().out
    assert "  slimming: 3,000,000 bytes saved (9,000,000 → 6,000,000, size ratio 0.67)" in out
    assert "40,000 of 120,000 events dropped; 2 of 3 traces got a slimmed copy" in out
    assert cli.main(["profile", "stop", "--slim"]) == 0
    out = capsys.readouterr().out
    assert "  slimming: 0 bytes saved" in out
    assert "torch_profiler_with_stack: true" in out
