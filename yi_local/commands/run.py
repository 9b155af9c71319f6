"""Generate one reply and stream it to stdout.

The prompt comes from the PROMPT argument or, without it (or with "-"), from standard input.
Chat models get the prompt as a user message in their chat template and stop at <|im_end|>;
--raw continues the text as is (for base models).

Examples:
  yi-local run Yi-6B-Chat-Q4_K_M.gguf "Write a haiku about the sea"
  echo "你好" | yi-local run Yi-6B-Chat-Q4_K_M.gguf --system "Answer in one sentence."
  yi-local run Yi-6B-Q4_K_M.gguf --raw "The capital of France is" --max-tokens 8
"""

from __future__ import annotations

import argparse
import sys

from yi_local.commands.options import (
    add_model_arg,
    add_runtime_args,
    add_sampling_args,
    load_options,
    resolve_model,
    sampling_params,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None, help="the prompt (default: stdin)")
    p.add_argument("--system", default=None, help="a system prompt (chat models)")
    p.add_argument("--raw", action="store_true", help="plain completion of PROMPT, without the chat template")
    p.add_argument("--verbose-timings", action="store_true", help="print tokens/s to stderr at the end")
    add_runtime_args(p)
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    from yi_local.errors import YiLocalError
    from yi_local.runtime import Finish, TextDelta, load_backend

    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise YiLocalError("no prompt", hint="give PROMPT as an argument or pipe it on standard input")
        data = sys.stdin.buffer.read()
        if not data.strip():
            raise YiLocalError("no prompt: standard input was empty", hint="give PROMPT as an argument or pipe text in")
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YiLocalError(f"standard input is not UTF-8 text (byte {e.start:,} is {data[e.start:e.start + 1]!r})",
                               hint="convert it first, e.g. `iconv -f latin1 -t utf-8 FILE | yi-local run ...`") from None  # fmt: skip
    for what, text in (("PROMPT", prompt), ("--system", args.system or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end].encode("utf-8", "surrogateescape")
            raise YiLocalError(f"{what} has bytes that are not UTF-8 ({bad!r})",
                               hint="give text in UTF-8 (convert it with iconv)") from None  # fmt: skip
    params = sampling_params(args)  # bad flags fail before a model is resolved or loaded
    options = load_options(args)
    model, backend_name = resolve_model(args)
    backend = load_backend(model, options, backend=backend_name)
    info = backend.info
    print(f"yi-local: {info.name} · {info.quantization} · {info.offload} · ctx {info.n_ctx}", file=sys.stderr)
    if args.raw:
        tokens = backend.text_tokens(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        tokens = backend.chat_tokens(messages)
    finish = None
    for event in backend.generate(tokens, params):
        if isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finish):
            finish = event
    sys.stdout.write("\n")
    if finish is not None and args.verbose_timings:
        t = finish.timings
        print(f"[{finish.reason}] prompt {t.evaluated_tokens} tok at {t.prompt_tps:.1f} tok/s, "
              f"generated {t.sampled_tokens} tok at {t.generate_tps:.1f} tok/s", file=sys.stderr)  # fmt: skip
    return 0
