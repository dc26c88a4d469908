"""Conversions between protobuf messages and omnistage's plain types. Protobuf stops here."""

from __future__ import annotations

import uuid
from typing import Any

from omnistage.types import (
    ChatTurn,
    EngineInfo,
    GenerateInput,
    OutputDelta,
    PipelineOutput,
    PipelineStatus,
    ProfileFileInfo,
    ProfileManifest,
    ProfileOptions,
    ProfileReport,
    ProfileSlimming,
    RequestMetrics,
    SamplingOptions,
    StageDescription,
    StageMetrics,
    StageProfileResult,
    StageStatus,
    TensorData,
)
from omnistage.v1 import common_pb2, orchestrator_pb2, stage_pb2


def sampling_from_pb(msg: common_pb2.SamplingParams) -> SamplingOptions:
    def opt(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    return SamplingOptions(
        max_tokens=opt("max_tokens"),
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        seed=opt("seed"),
        stop=tuple(msg.stop),
        ignore_eos=opt("ignore_eos"),
    )


def sampling_to_pb(options: SamplingOptions) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(stop=list(options.stop))
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"):
        value = getattr(options, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def tensor_from_pb(msg: common_pb2.Tensor) -> TensorData:
    return TensorData(dtype=msg.dtype, shape=tuple(msg.shape), data=bytes(msg.data))


def tensor_to_pb(tensor: TensorData) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=tensor.dtype, shape=list(tensor.shape), data=tensor.data)


def generate_input_from_pb(msg: Any) -> GenerateInput:
    """A GenerateRequest (or a PipelineRequest, which has the same input fields)."""
    return GenerateInput(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=msg.prompt,
        token_ids=tuple(msg.token_ids),
        messages=tuple(ChatTurn(role=m.role, content=m.content) for m in msg.messages),
        tensor=tensor_from_pb(msg.tensor) if msg.HasField("tensor") else None,
        sampling=sampling_from_pb(msg.sampling),
    )


def generate_input_to_pb(request: GenerateInput) -> stage_pb2.GenerateRequest:
    msg = stage_pb2.GenerateRequest(
        request_id=request.request_id,
        prompt=request.prompt,
        token_ids=list(request.token_ids),
        messages=[common_pb2.ChatMessage(role=t.role, content=t.content) for t in request.messages],
        sampling=sampling_to_pb(request.sampling),
    )
    if request.tensor is not None:
        msg.tensor.CopyFrom(tensor_to_pb(request.tensor))
    return msg


def metrics_to_pb(metrics: RequestMetrics) -> common_pb2.RequestMetrics:
    return common_pb2.RequestMetrics(
        queue_time_s=metrics.queue_time_s,
        time_to_first_token_s=metrics.time_to_first_token_s,
        prompt_tokens=metrics.prompt_tokens,
        generated_tokens=metrics.generated_tokens,
        duration_s=metrics.duration_s,
    )


def metrics_from_pb(msg: common_pb2.RequestMetrics) -> RequestMetrics:
    return RequestMetrics(
        queue_time_s=msg.queue_time_s,
        time_to_first_token_s=msg.time_to_first_token_s,
        prompt_tokens=msg.prompt_tokens,
        generated_tokens=msg.generated_tokens,
        duration_s=msg.duration_s,
    )


def delta_to_pb(delta: OutputDelta) -> stage_pb2.GenerateResponse:
    msg = stage_pb2.GenerateResponse(
        request_id=delta.request_id,
        token_ids=list(delta.token_ids),
        text=delta.text,
        finished=delta.finished,
        finish_reason=delta.finish_reason,
    )
    if delta.metrics is not None:
        msg.metrics.CopyFrom(metrics_to_pb(delta.metrics))
    if delta.tensor is not None:
        msg.tensor.CopyFrom(tensor_to_pb(delta.tensor))
    return msg


def delta_from_pb(msg: stage_pb2.GenerateResponse) -> OutputDelta:
    return OutputDelta(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finished=msg.finished,
        finish_reason=msg.finish_reason,
        metrics=metrics_from_pb(msg.metrics) if msg.HasField("metrics") else None,
        tensor=tensor_from_pb(msg.tensor) if msg.HasField("tensor") else None,
    )


def profile_options_from_pb(msg: Any) -> ProfileOptions:
    """A StartProfileRequest or PipelineStartProfileRequest; 0 means the configured value."""
    return ProfileOptions(
        label=msg.label,
        delay_iterations=msg.delay_iterations or None,
        max_iterations=msg.max_iterations or None,
    )


def manifest_to_pb(manifest: ProfileManifest) -> stage_pb2.StopProfileResponse:
    return stage_pb2.StopProfileResponse(
        session_id=manifest.session_id,
        profile_dir=manifest.profile_dir,
        stop_seconds=manifest.stop_seconds,
        files=files_to_pb(manifest.files),
    )


def manifest_from_pb(msg: stage_pb2.StopProfileResponse) -> ProfileManifest:
    return ProfileManifest(
        session_id=msg.session_id,
        profile_dir=msg.profile_dir,
        stop_seconds=msg.stop_seconds,
        files=files_from_pb(msg.files),
    )


def stage_description_to_pb(desc: StageDescription) -> stage_pb2.StageInfo:
    return stage_pb2.StageInfo(
        name=desc.name,
        engine=desc.engine.engine,
        model=desc.engine.model,
        profiling_enabled=desc.profiling_enabled,
        profiling_active=desc.profiling_active,
        profile_session_id=desc.profile_session_id,
        running_requests=desc.engine.running_requests,
        server_time_unix_ns=desc.server_time_unix_ns,
        version=desc.version,
        engine_version=desc.engine.engine_version,
        max_model_len=desc.engine.max_model_len,
        device=desc.engine.device,
        profiler_dir=desc.profiler_dir,
    )


def stage_description_from_pb(msg: stage_pb2.StageInfo) -> StageDescription:
    engine = EngineInfo(
        engine=msg.engine,
        model=msg.model,
        running_requests=msg.running_requests,
        engine_version=msg.engine_version,
        max_model_len=msg.max_model_len,
        device=msg.device,
    )
    return StageDescription(
        name=msg.name,
        engine=engine,
        profiling_enabled=msg.profiling_enabled,
        profiling_active=msg.profiling_active,
        profile_session_id=msg.profile_session_id,
        server_time_unix_ns=msg.server_time_unix_ns,
        version=msg.version,
        profiler_dir=msg.profiler_dir,
    )


def pipeline_status_to_pb(status: PipelineStatus) -> orchestrator_pb2.PipelineInfo:
    return orchestrator_pb2.PipelineInfo(
        name=status.name,
        stages=[
            orchestrator_pb2.StageStatus(
                name=s.name,
                index=s.index,
                addresses=s.addresses,
                health=s.health,
                profiling_active=s.profiling_active,
                engine=s.engine,
                model=s.model,
                error=s.error,
            )
            for s in status.stages
        ],
        profiling_active=status.profiling_active,
        profile_session_id=status.profile_session_id,
    )


def pipeline_status_from_pb(msg: orchestrator_pb2.PipelineInfo) -> PipelineStatus:
    stages = tuple(
        StageStatus(
            name=s.name,
            index=s.index,
            addresses=tuple(s.addresses),
            health=s.health,
            profiling_active=s.profiling_active,
            engine=s.engine,
            model=s.model,
            error=s.error,
        )
        for s in msg.stages
    )
    return PipelineStatus(
        name=msg.name,
        stages=stages,
        profiling_active=msg.profiling_active,
        profile_session_id=msg.profile_session_id,
    )


def pipeline_output_from_pb(msg: orchestrator_pb2.PipelineResponse) -> PipelineOutput:
    metrics = None
    if msg.HasField("metrics"):
        metrics = StageMetrics(
            queue_time_s=msg.metrics.queue_time_s,
            time_to_first_output_s=msg.metrics.time_to_first_output_s,
            duration_s=msg.metrics.duration_s,
            handoff_s=msg.metrics.handoff_s,
            stage_time_s=msg.metrics.stage_time_s,
        )
    return PipelineOutput(
        stage=msg.stage,
        stage_index=msg.stage_index,
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finished=msg.finished,
        final=msg.final,
        finish_reason=msg.finish_reason,
        metrics=metrics,
        tensor=tensor_from_pb(msg.tensor) if msg.HasField("tensor") else None,
        replica=msg.replica,
    )


def files_to_pb(files: tuple[ProfileFileInfo, ...]) -> list[common_pb2.ProfileFile]:
    return [
        common_pb2.ProfileFile(name=f.name, size_bytes=f.size_bytes, sha256=f.sha256) for f in files
    ]


def files_from_pb(files: Any) -> tuple[ProfileFileInfo, ...]:
    return tuple(ProfileFileInfo(f.name, f.size_bytes, f.sha256) for f in files)


def report_to_pb(report: ProfileReport) -> orchestrator_pb2.ProfileReport:
    slim = report.slimming
    return orchestrator_pb2.ProfileReport(
        session_id=report.session_id,
        output_dir=report.output_dir,
        timeline=report.timeline,
        summary=report.summary,
        slimming=None
        if slim is None
        else orchestrator_pb2.ProfileSlimming(
            bytes_before=slim.bytes_before,
            bytes_after=slim.bytes_after,
            events_before=slim.events_before,
            events_after=slim.events_after,
            traces=slim.traces,
            copies_written=slim.copies_written,
        ),
        stages=[
            orchestrator_pb2.StageProfileResult(
                stage=r.stage,
                ok=r.ok,
                error=r.error,
                replica=r.replica,
                stage_session_id=r.stage_session_id,
                local_dir=r.local_dir,
                stop_seconds=r.stop_seconds,
                files=files_to_pb(r.files),
            )
            for r in report.stages
        ],
        session_files=files_to_pb(report.session_files),
        timelines=list(report.timelines),
        warnings=list(report.warnings),
    )


def report_from_pb(msg: orchestrator_pb2.ProfileReport) -> ProfileReport:
    slim = msg.slimming
    return ProfileReport(
        session_id=msg.session_id,
        output_dir=msg.output_dir,
        timeline=msg.timeline,
        summary=msg.summary,
        slimming=ProfileSlimming(
            bytes_before=slim.bytes_before,
            bytes_after=slim.bytes_after,
            events_before=slim.events_before,
            events_after=slim.events_after,
            traces=slim.traces,
            copies_written=slim.copies_written,
        )
        if msg.HasField("slimming")
        else None,
        stages=tuple(
            StageProfileResult(
                stage=r.stage,
                replica=r.replica,
                ok=r.ok,
                error=r.error,
                files=files_from_pb(r.files),
                stage_session_id=r.stage_session_id,
                local_dir=r.local_dir,
                stop_seconds=r.stop_seconds,
            )
            for r in msg.stages
        ),
        session_files=files_from_pb(msg.session_files),
        timelines=tuple(msg.timelines),
        warnings=tuple(msg.warnings),
    )
