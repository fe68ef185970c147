"""``preftune export``: argument parsing only; the work is in :mod:`preftune.model.export_gguf` (the GGUF)
and :mod:`preftune.model.export_ollama` (the Modelfile).

``register(subparsers)`` adds the ``export`` command to the main parser; the handler returns the exit code.
"""

from __future__ import annotations

import argparse

EXPORT_DESCRIPTION = """\
Write a trained model as one GGUF file, the format llama.cpp, Ollama and LM Studio run. MODEL_DIR is
a Hugging Face folder (a 'preftune train' output, or any Llama, Mistral or Qwen2 model folder) or a
LoRA adapter folder, whose adapters are merged into their base model first. The file carries the
tokenizer (vocabulary, merges, special tokens) and the chat template, so a runtime formats chats as
training did. Written by preftune itself with the 'gguf' package: no llama.cpp checkout is needed."""

EXPORT_EPILOG = """\
quantizations (file size for SmolLM2-135M; docs/export.md: the log-prob error of each, in llama.cpp):
  f32   exact weights, 4 bytes each                                        540 MB
  f16   2 bytes per weight (norms stay f32); the default                   271 MB
  bf16  2 bytes per weight, float32's range                                271 MB
  q8_0  blocks of 32 int8 weights with one f16 scale: 1.06 bytes a weight  145 MB

A model that cannot be exported (another architecture, a vocabulary GGUF cannot hold, an adapter
folder whose adapters were never trained, no tokenizer.json) is refused before anything is written.
The file is written beside OUT.gguf and renamed onto it when complete.

examples:
  preftune export runs/dpo1 --gguf runs/dpo1.Q8_0.gguf --quant q8_0 --ollama
  ollama create dpo1-q8_0 -f runs/Modelfile && ollama run dpo1-q8_0
  preftune export runs/lora1 --gguf lora1.F16.gguf        # adapters merged into their base first"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to ``subparsers``; returns its parser."""
    from preftune.model.export_gguf import QUANTS

    export = subparsers.add_parser("export", help="write a trained model as a GGUF file (llama.cpp, Ollama)",
                                   description=EXPORT_DESCRIPTION, epilog=EXPORT_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    export.add_argument("model_dir", metavar="MODEL_DIR", help="the trained model folder (or LoRA adapter folder)")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    export.add_argument("--quant", default="f16", choices=tuple(QUANTS),
                        help="how 2-D weights are stored (default: f16)")
    export.add_argument("--name", metavar="NAME", help="general.name in the file (default: MODEL_DIR's name)")
    export.add_argument("--ollama", action="store_true",
                        help="also write an Ollama Modelfile beside OUT.gguf (FROM, the chat TEMPLATE when it is "
                             "ChatML, stop tokens from the EOS tokens) and print the 'ollama create' command")
    export.set_defaults(func=cmd_export)
    return export


def cmd_export(args) -> int:
    from preftune.common.files import size_text
    from preftune.model.export_gguf import export_gguf
    from preftune.model.export_ollama import ollama_name, write_modelfile

    result = export_gguf(args.model_dir, args.gguf, quant=args.quant, name=args.name)
    print(f"wrote {result.path} ({result.quant}, {size_text(result.size_bytes)}, {result.tensors} tensors)")
    if args.ollama:
        vocab = result.plan.vocab
        modelfile, has_template = write_modelfile(result.path, result.plan.tokenizer, vocab.stop_tokens)
        print(f"wrote {modelfile}" + ("" if has_template else " (no TEMPLATE: the chat template is not ChatML; "
                                      "Ollama reads the one stored in the GGUF)"))
        name = ollama_name(result.path)
        print(f"next: ollama create {name} -f {modelfile} && ollama run {name}")
    return 0
