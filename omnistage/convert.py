"""Conversions between protobuf messages and omnistage's plain types. Protobuf stops here."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, TypeVar

from omnistage.shm import SharedTensorRef
from omnistage.types import (
    ChatTurn,
    CriticalSegment,
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
    RequestCriticalPath,
    RequestMetrics,
    SamplingOptions,
    StageDescription,
    StageMetrics,
    StageProfileResult,
    StageStatus,
    StageStepTime,
    TensorData,
)
from omnistage.v1 import common_pb2, orchestrator_pb2, stage_pb2

T = TypeVar("T")


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
    data = tensor.data if isinstance(tensor.data, bytes) else bytes(tensor.data)
    return common_pb2.Tensor(dtype=tensor.dtype, shape=list(tensor.shape), data=data)


def shared_tensor_from_pb(msg: common_pb2.SharedTensor) -> SharedTensorRef:
    return from_fields(msg, SharedTensorRef, shape=tuple(msg.shape))


def shared_tensor_to_pb(ref: SharedTensorRef) -> common_pb2.SharedTensor:
    return common_pb2.SharedTensor(**fields_of(ref, shape=list(ref.shape)))


def generate_input_from_pb(msg: Any) -> GenerateInput:
    """A GenerateRequest (or a PipelineRequest, which has the same input fields)."""
    return GenerateInput(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=msg.prompt,
        token_ids=tuple(msg.token_ids),
        messages=tuple(ChatTurn(role=m.role, content=m.content) for m in msg.messages),
        tensor=tensor_from_pb(msg.tensor) if msg.HasField("tensor") else None,
        sampling=sampling_from_pb(msg.sampling),
        final_only=getattr(msg, "final_only", False),  # a PipelineRequest has none
    )


def generate_input_to_pb(request: GenerateInput) -> stage_pb2.GenerateRequest:
    msg = stage_pb2.GenerateRequest(
        request_id=request.request_id,
        prompt=request.prompt,
        token_ids=list(request.token_ids),
        messages=[common_pb2.ChatMessage(role=t.role, content=t.content) for t in request.messages],
        sampling=sampling_to_pb(request.sampling),
        final_only=request.final_only,
    )
    if request.tensor is not None:
        msg.tensor.CopyFrom(tensor_to_pb(request.tensor))
    return msg


def fields_of(obj: Any, *, leave: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    """A plain dataclass's fields by name (those in `overrides` replaced, those in `leave`
    left out), for a message or another dataclass of the same field names."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in leave}
    return values | overrides


def from_fields(msg: Any, cls: type[T], **overrides: Any) -> T:
    """A plain dataclass `cls` from a message holding fields of the same names."""
    kind: Any = cls
    names = [f.name for f in dataclasses.fields(kind) if f.name not in overrides]
    return cls(**{name: getattr(msg, name) for name in names}, **overrides)


def metrics_to_pb(metrics: RequestMetrics) -> common_pb2.RequestMetrics:
    return common_pb2.RequestMetrics(**fields_of(metrics))


def metrics_from_pb(msg: common_pb2.RequestMetrics) -> RequestMetrics:
    return from_fields(msg, RequestMetrics)


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
    """A StartProfileRequest or PipelineStartProfileRequest; 0 means the configured value.
    Only the pipeline's request has `timing_only`."""
    return ProfileOptions(
        label=msg.label,
        delay_iterations=msg.delay_iterations or None,
        max_iterations=msg.max_iterations or None,
        timing_only=bool(getattr(msg, "timing_only", False)),
    )


def manifest_to_pb(manifest: ProfileManifest) -> stage_pb2.StopProfileResponse:
    return stage_pb2.StopProfileResponse(**fields_of(manifest, files=files_to_pb(manifest.files)))


def manifest_from_pb(msg: stage_pb2.StopProfileResponse) -> ProfileManifest:
    return from_fields(msg, ProfileManifest, files=files_from_pb(msg.files))


def stage_description_to_pb(desc: StageDescription) -> stage_pb2.StageInfo:
    # the message is flat: the engine's fields beside the stage's, `engine` its kind
    engine = fields_of(desc.engine, leave=("dead_reason",))  # the stage's own health watch
    return stage_pb2.StageInfo(**(engine | fields_of(desc, engine=desc.engine.engine)))


def stage_description_from_pb(msg: stage_pb2.StageInfo) -> StageDescription:
    engine = from_fields(msg, EngineInfo, dead_reason="")  # a serving stage's engine is alive
    return from_fields(msg, StageDescription, engine=engine)


def pipeline_status_to_pb(status: PipelineStatus) -> orchestrator_pb2.PipelineInfo:
    stages = [orchestrator_pb2.StageStatus(**fields_of(s)) for s in status.stages]
    return orchestrator_pb2.PipelineInfo(**fields_of(status, stages=stages))


def pipeline_status_from_pb(msg: orchestrator_pb2.PipelineInfo) -> PipelineStatus:
    stages = tuple(from_fields(s, StageStatus, addresses=tuple(s.addresses)) for s in msg.stages)
    return from_fields(msg, PipelineStatus, stages=stages)


def pipeline_output_from_pb(msg: orchestrator_pb2.PipelineResponse) -> PipelineOutput:
    return from_fields(
        msg,
        PipelineOutput,
        token_ids=tuple(msg.token_ids),
        metrics=from_fields(msg.metrics, StageMetrics) if msg.HasField("metrics") else None,
        tensor=tensor_from_pb(msg.tensor) if msg.HasField("tensor") else None,
    )


def files_to_pb(files: tuple[ProfileFileInfo, ...]) -> list[common_pb2.ProfileFile]:
    return [common_pb2.ProfileFile(**fields_of(f)) for f in files]


def files_from_pb(files: Any) -> tuple[ProfileFileInfo, ...]:
    return tuple(from_fields(f, ProfileFileInfo) for f in files)


def critical_path_to_pb(path: RequestCriticalPath) -> orchestrator_pb2.RequestCriticalPath:
    def segments(items: tuple[CriticalSegment, ...]) -> list[orchestrator_pb2.CriticalSegment]:
        return [orchestrator_pb2.CriticalSegment(**fields_of(s)) for s in items]

    return orchestrator_pb2.RequestCriticalPath(
        **fields_of(
            path,
            first_output=segments(path.first_output),
            end_to_end=segments(path.end_to_end),
            steps=[orchestrator_pb2.StageStepTime(**fields_of(s)) for s in path.steps],
        )
    )


def critical_path_from_pb(msg: orchestrator_pb2.RequestCriticalPath) -> RequestCriticalPath:
    def segments(items: Any) -> tuple[CriticalSegment, ...]:
        return tuple(from_fields(s, CriticalSegment) for s in items)

    return from_fields(
        msg,
        RequestCriticalPath,
        first_output=segments(msg.first_output),
        end_to_end=segments(msg.end_to_end),
        steps=tuple(from_fields(s, StageStepTime) for s in msg.steps),
    )


def report_to_pb(report: ProfileReport) -> orchestrator_pb2.ProfileReport:
    slim = report.slimming
    stages = [
        orchestrator_pb2.StageProfileResult(**fields_of(r, files=files_to_pb(r.files)))
        for r in report.stages
    ]
    return orchestrator_pb2.ProfileReport(
        **fields_of(
            report,
            leave=("downloaded_to",),  # the caller's own copy: never on the wire
            slimming=None if slim is None else orchestrator_pb2.ProfileSlimming(**fields_of(slim)),
            stages=stages,
            session_files=files_to_pb(report.session_files),
            critical_paths=[critical_path_to_pb(p) for p in report.critical_paths],
        )
    )


def report_from_pb(msg: orchestrator_pb2.ProfileReport) -> ProfileReport:
    stages = tuple(
        from_fields(r, StageProfileResult, files=files_from_pb(r.files)) for r in msg.stages
    )
    return from_fields(
        msg,
        ProfileReport,
        slimming=from_fields(msg.slimming, ProfileSlimming) if msg.HasField("slimming") else None,
        stages=stages,
        session_files=files_from_pb(msg.session_files),
        timelines=tuple(msg.timelines),
        warnings=tuple(msg.warnings),
        critical_paths=tuple(critical_path_from_pb(p) for p in msg.critical_paths),
        downloaded_to="",
    )
