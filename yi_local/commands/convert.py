"""Convert a Hugging Face Yi model folder to GGUF, then quantize it with llama.cpp.

Examples:
  yi-local convert ./Yi-6B-Chat --q Q4_K_M          # → ./Yi-6B-Chat-Q4_K_M.gguf
  yi-local convert 01-ai/Yi-6B-Chat --q Q5_K_M      # downloads what conversion needs first
  yi-local convert Yi-6B-Chat-F16.gguf --q Q4_K_M   # quantize an existing GGUF
  yi-local convert ./Yi-6B-Chat --q q4_k_m --q q8_0 -o models/
  yi-local convert ./Yi-6B-Chat --outtype f16 -o yi-6b-chat-f16.gguf
  yi-local convert ./Yi-34B-Chat --q IQ3_M --imatrix    # computes an importance matrix first
  yi-local convert ./Yi-6B-Chat --q Q2_K --imatrix-file Yi-6B-Chat.imatrix.gguf

Chat models get <|im_end|> as their end-of-turn and eos token and their chat template embedded,
so llama.cpp stops where Yi ends its turn with no hand patching.

An importance matrix (llama.cpp's imatrix: each weight column's mean squared input over a calibration
text) makes the low levels markedly better; the IQ1/IQ2 levels, IQ3_XXS, IQ3_XS and Q2_K_S need one.
--imatrix computes it from the unquantized model on a packaged English/Chinese/code text, saves it
beside the outputs as NAME.imatrix.gguf (llama.cpp's format: llama-quantize reads it) and records it
in the quantized files' quantize.imatrix.* keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from yi_local.quant_types import QUANT_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a local Hugging Face model folder, a hub repo id or catalog name "
                   "(downloaded first), or a .gguf to quantize again")
    p.add_argument("-o", "--out", type=Path, help="output folder, or a .gguf path when one file is made "
                   "(default: the current folder)")
    p.add_argument("--outtype", default="auto", metavar="TYPE",
                   help="the unquantized GGUF: auto|f32|f16|bf16|q8_0 (auto: bf16→BF16, f16→F16, f32→F16). "
                   "Given explicitly, it is kept beside the --q files")
    p.add_argument("--q", dest="quants", action="append", default=[], metavar="TYPE",
                   help="quantize to TYPE (repeatable, case-insensitive): " + ", ".join(QUANT_TYPES))
    p.add_argument("--imatrix", action="store_true", help="compute an importance matrix and quantize with it "
                   "(needed for the IQ1/IQ2 levels, IQ3_XXS, IQ3_XS and Q2_K_S; better results below Q5)")
    p.add_argument("--imatrix-file", type=Path, metavar="FILE", help="quantize with this importance matrix "
                   "(made by yi-local or llama.cpp's llama-imatrix, .gguf or .dat) instead of computing one")
    p.add_argument("--calibration", type=Path, metavar="FILE", help="compute the importance matrix on this UTF-8 "
                   "text instead of the packaged one (implies --imatrix)")
    p.add_argument("--threads", type=int, default=None, help="threads for conversion, the importance matrix "
                   "and quantization (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files (never an input)")
    p.add_argument("--keep-source", action="store_true", help="keep weights downloaded from the hub (default: removed)")


def run(args: argparse.Namespace) -> int:
    from yi_local.errors import YiLocalError
    from yi_local.progress import TerminalProgress
    from converters.importance import ImatrixRequest
    from yi_local.conversion import convert_source
    from yi_local.units import format_size

    src = Path(args.src).expanduser()
    if src.is_file() and src.suffix.lower() != ".gguf":
        folder = src.parent if src.name == "config.json" else None
        raise YiLocalError(
            f"{args.src} is a file, not a model folder or a .gguf",
            hint=f"give the folder that holds config.json: yi-local convert {folder}" if folder
            else "give a Hugging Face model folder (the one holding config.json), a .gguf, or a repo id",
        )

    imatrix = ImatrixRequest(compute=args.imatrix or args.calibration is not None, file=args.imatrix_file,
                             calibration=args.calibration)  # fmt: skip
    with TerminalProgress() as progress:
        result, freed = convert_source(args.src, out=args.out, outtype=args.outtype, quants=args.quants,
                                       threads=args.threads, force=args.force, keep_source=args.keep_source,
                                       progress=progress, imatrix=imatrix)  # fmt: skip
    for note in result.notes:
        print(f"note: {note}")
    if result.imatrix is not None:
        print(f"wrote {result.imatrix} (importance matrix, {result.imatrix_provenance['chunks']} windows of "
              f"{result.imatrix_provenance['dataset']})")
    for path in result.files:
        print(f"wrote {path} ({format_size(path.stat().st_size)})")
    if freed:
        print(f"removed the downloaded weights, freeing {format_size(freed)}")
    return 0
