"""Session folders: which op table becomes profiler_out_<stage>.txt."""

from __future__ import annotations

from pathlib import Path

from services.profiling.sessions import ensure_op_table


def test_engine_table_wins_over_front_end_table_whatever_the_host_name(tmp_path: Path) -> None:
    # A pod name that sorts before "rank0" must not make the front end's table the stage's.
    (tmp_path / "a-pod_12.async_llm.profiler_out.txt").write_text("front end ops\n")
    (tmp_path / "rank0.profiler_out.txt").write_text("engine ops\n")
    table = ensure_op_table(tmp_path, "thinker")
    assert table == tmp_path / "profiler_out_thinker.txt"
    assert table.read_text() == "engine ops\n"
    kept = tmp_path / "profiler_out_thinker.a-pod_12.async_llm.profiler_out.txt"
    assert kept.read_text() == "front end ops\n"


def test_empty_tables_are_dropped_and_none_without_a_trace(tmp_path: Path) -> None:
    (tmp_path / "rank0.profiler_out.txt").write_text("\n")
    assert ensure_op_table(tmp_path, "s") is None
    assert not list(tmp_path.iterdir())
