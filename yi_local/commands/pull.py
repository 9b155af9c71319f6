"""Download a Yi model from the Hugging Face hub, convert and quantize it into the model store.

NAME is a catalog name (yi:6b-chat, yi:34b-200k, yi-1.5:9b-chat, yi-coder:9b-chat, ...; `yi-local
doctor` lists them with what fits this machine) or any hub repo id of a Llama-architecture model,
optionally with a quantization: yi:6b-chat:q5_k_m (default Q4_K_M). Only the files conversion needs
are downloaded; a cut-off download resumes where it stopped; every file is checked against the hub's
checksums. HF_TOKEN and HF_ENDPOINT (a mirror) are honoured; HF_HUB_OFFLINE=1 uses only what is on disk.

Pulls of one model run one at a time: a second waits for the first (saying so) and reuses its
download, which is removed when the last pull that needs it is done, unless one of them had --keep-source.

The IQ levels (yi:34b-chat:iq3_m) and Q2_K_S are quantized with an importance matrix computed on the
way, on the packaged calibration text; --imatrix does the same at the other levels. `yi-local show`
says which matrix a file was made with.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME[:QUANT]", help="e.g. yi:6b-chat, yi:34b-chat:q5_k_m, 01-ai/Yi-1.5-9B-Chat")
    p.add_argument("--keep-source", action="store_true",
                   help="keep the downloaded Hugging Face weights (default: removed after a verified conversion, "
                   "once no other command uses them)")
    p.add_argument("--imatrix", action="store_true", help="quantize with an importance matrix computed on the way "
                   "(always done for the IQ levels and Q2_K_S; better quality below Q5, some minutes more)")
    p.add_argument("--threads", type=_threads, default=None, help="threads for conversion and quantization")


def _threads(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of threads from 1 to 1024, not {value[:40]!r}")
    return n


def run(args: argparse.Namespace) -> int:
    from yi_local.hub import download_path
    from yi_local.progress import TerminalProgress
    from yi_local.pull import pull
    from yi_local.units import format_size

    with TerminalProgress() as progress:
        result = pull(args.name, keep_source=args.keep_source, progress=progress, threads=args.threads,
                      imatrix=args.imatrix)  # fmt: skip
    model = result.model
    if result.already_present:
        print(f"{model.full_name} is already in the store: {model.path}")
    else:
        print(f"pulled {model.full_name}: {model.path} ({format_size(model.size)})")
    if result.kept_source:
        print(f"kept the downloaded weights in {result.kept_source}")
    elif result.freed_bytes:
        print(f"removed the downloaded weights, freeing {format_size(result.freed_bytes)}")
    elif not result.already_present and download_path(model.repo).is_dir():
        print(f"the downloaded weights stay in {download_path(model.repo)}: another command is using them, "
              "or a pull with --keep-source kept them")  # fmt: skip
    return 0
