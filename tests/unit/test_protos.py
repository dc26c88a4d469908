"""The committed stubs are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in gen_protos.generate(tmp_path)}
    committed_dir = ROOT / "omnistage" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"stale stubs {stale}: run `make protos` and commit omnistage/v1/"


def test_contract_names_exist() -> None:
    from omnistage.v1 import orchestrator_pb2, stage_pb2

    stage = stage_pb2.DESCRIPTOR.services_by_name["Stage"]
    assert set(stage.methods_by_name) == {
        "Generate",
        "StartProfile",
        "StopProfile",
        "FetchProfileFile",
        "GetInfo",
        "ValidateSampling",
    }
    orchestrator = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"]
    assert set(orchestrator.methods_by_name) == {
        "Generate",
        "StartProfile",
        "StopProfile",
        "GetPipeline",
        "StopProfileStream",
        "ListSessions",
        "FetchSessionFile",
        "DeleteSession",
    }
    report = orchestrator_pb2.ProfileReport.DESCRIPTOR.fields_by_name
    assert {"session_id", "output_dir", "stages", "timeline", "session_files"} <= set(report)
    fetch = orchestrator_pb2.FetchSessionFileRequest.DESCRIPTOR.fields_by_name
    assert {"session_id", "name", "chunk_size", "offset"} <= set(fetch)
    fields = stage_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {"request_id", "prompt", "token_ids", "messages", "tensor", "sampling"} <= set(fields)
    assert stage_pb2.DESCRIPTOR.package == "omnistage.v1"
