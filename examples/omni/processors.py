"""Edge processors of the omni pipeline, named in its YAML as `examples.omni.processors:NAME`.

A processor takes (the previous stage's output, the client's request, the edge's InputConfig)
and returns the next stage's input. With `stream_chunk` set on the edge, `output` holds one
chunk of the previous stage's tokens, not all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from omnistage.tensors import tensor_from_numpy
from omnistage.types import GenerateInput
from orchestrator.config import InputConfig
from orchestrator.processors import EmptyStageOutputError, StageOutput

CODEBOOK_SIZE = 1024
"""code2wav's codebook size (`examples.omni.code2wav.CODEBOOK_SIZE`; not imported from there,
so that the orchestrator does not load torch)."""


def talker_codes(output: StageOutput) -> np.ndarray[Any, Any]:
    """The talker's token ids as codec codes: token_id % CODEBOOK_SIZE, int64."""
    if not output.token_ids:
        raise EmptyStageOutputError(  # not the client's error: FAILED_PRECONDITION
            f"stage {output.stage!r} produced no tokens, so code2wav has no codes; "
            "give the talker max_tokens ≥ 1 (and ignore_eos: true)"
        )
    return np.asarray(output.token_ids, dtype=np.int64) % CODEBOOK_SIZE


def tokens_to_codes(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """code2wav's input: the talker's tokens as an int64 code tensor of shape [T]."""
    codes = talker_codes(output)
    return GenerateInput(request_id=original.request_id, tensor=tensor_from_numpy(codes))


def tokens_to_code_ids(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """The same codes sent as token_ids instead of a tensor."""
    codes = talker_codes(output)
    return GenerateInput(request_id=original.request_id, token_ids=tuple(int(c) for c in codes))
