"""vLLM-Omni's profiling endpoints on the orchestrator's HTTP API.

POST /start_profile   {"stages": [0, 2] or names, "label": ...}; no body profiles every stage
POST /stop_profile    the ProfileReport as JSON; each file of the session with its download URL
GET  /v1/profile/sessions/{session_id}/files/{name}   one file of a kept session, streamed

They drive the same profiler as the gRPC StartProfile and StopProfile, and serve files from
the same session store, by the same path checks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistage.errors import InvalidRequestError
from omnistage.types import ProfileOptions
from orchestrator.http_openai import describe_errors
from orchestrator.servicer import slim_options
from orchestrator.stage_call import aclose

if TYPE_CHECKING:
    from orchestrator.http_api import FrontDoor

FILE_ROUTE = "/v1/profile/sessions/{session_id}/files/{name:path}"
_RANGE = re.compile(r"bytes=(\d+)-$")


class StartProfileBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[int | str] = Field(default_factory=list, description="Indices or names.")
    label: str = ""
    delay_iterations: int | None = None
    max_iterations: int | None = None
    timing_only: bool = False


class StopProfileBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[int | str] = Field(default_factory=list, description="Empty: all profiling.")
    output_dir: str = Field(default="", description="Relative to the profile root.")
    slim: bool = False
    slim_min_duration_us: float = 0.0
    slim_patterns: list[str] = Field(default_factory=list)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as `model`; no body at all means every default (vLLM posts none)."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(describe_errors(exc.errors(include_url=False))) from None


def add_profile_routes(app: FastAPI, door: FrontDoor) -> None:
    profiling = [door.guard("profiling")]

    @app.post("/start_profile", dependencies=profiling)
    async def start_profile(request: Request) -> dict[str, Any]:
        body: StartProfileBody = await _body(request, StartProfileBody)
        options = ProfileOptions(
            label=body.label,
            delay_iterations=body.delay_iterations,
            max_iterations=body.max_iterations,
            timing_only=body.timing_only,
        )
        session_id, started = await door.profiler.start([str(s) for s in body.stages], options)
        return {"session_id": session_id, "stages": started}

    @app.post("/stop_profile", dependencies=profiling)
    async def stop_profile(request: Request) -> dict[str, Any]:
        body: StopProfileBody = await _body(request, StopProfileBody)
        slim = None
        if body.slim or body.slim_min_duration_us or body.slim_patterns:
            slim = slim_options(body.slim_min_duration_us, body.slim_patterns)
        report = await door.profiler.stop([str(s) for s in body.stages], body.output_dir, slim=slim)
        record = dataclasses.asdict(report)
        for item in record["session_files"]:
            item["url"] = file_url(request, report.session_id, item["name"])
        return record

    @app.get(FILE_ROUTE, dependencies=profiling)
    async def session_file(request: Request, session_id: str, name: str) -> Response:
        return await _file_response(door, request, session_id, name)


def file_url(request: Request, session_id: str, name: str) -> str:
    """Where one file of a session is downloaded from, on this server."""
    path = FILE_ROUTE.replace(":path", "").format(
        session_id=quote(session_id, safe=""), name=quote(name, safe="/")
    )
    return str(request.base_url).rstrip("/") + path


async def _file_response(door: FrontDoor, request: Request, session_id: str, name: str) -> Response:
    """The file, from `Range: bytes=N-` on when asked (a cut download resumes there)."""
    match = _RANGE.match(request.headers.get("range", "").strip())
    offset = int(match.group(1)) if match else 0
    chunks = door.sessions.read_chunks(session_id, name, offset=offset)
    try:
        first = await anext(chunks, None)  # the path checks and the open happen here
    except BaseException:
        await aclose(chunks)
        raise
    total = first[2] if first is not None else offset
    if match and first is None:  # nothing from there on: the caller has it all
        return Response(status_code=416, headers={"Content-Range": f"bytes */{total}"})
    headers = {
        "Content-Length": str(total - offset),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name.rsplit('/', 1)[-1])}",
        "Accept-Ranges": "bytes",
    }
    status = 200
    if match:
        status = 206
        headers["Content-Range"] = f"bytes {offset}-{total - 1}/{total}"

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first[1]
                async for _, data, _ in chunks:
                    yield data
        finally:
            await aclose(chunks)

    return StreamingResponse(
        body(), status_code=status, media_type="application/octet-stream", headers=headers
    )
