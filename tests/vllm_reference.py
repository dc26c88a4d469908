"""vLLM's own greedy output for fixed prompts, with the settings a stage uses.

Run as a script (vLLM spawns processes, so the entry point is guarded):
    python tests/vllm_reference.py '{"prompts": [...], "max_tokens": N}' OUT.json
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from omnistage.models import resolve_model

    spec = json.loads(sys.argv[1])
    llm = LLM(
        model=str(resolve_model("smollm2")),
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
    )
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    results = []
    for prompt in spec["prompts"]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        (output,) = llm.generate({"prompt_token_ids": list(ids)}, params)
        completion = output.outputs[0]
        results.append({"token_ids": list(completion.token_ids), "text": completion.text})
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
