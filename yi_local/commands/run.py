"""Generate one reply and stream it to stdout.

The prompt comes from the PROMPT argument or, without it (or with "-"), from standard input.
Chat models get the prompt as a user message in their chat template and stop at <|im_end|>;
--raw continues the text as is (for base models).

--prompt-cache FILE keeps the KV cache of the prompt in FILE (and FILE.meta) across runs, like
llama.cpp's --prompt-cache: a run whose prompt starts with the cached one (the same long document or
system prompt) evaluates only the rest. The cache is used only with the same model file, --ctx,
--kv-type and --flash-attn; otherwise, or when it is damaged, the prompt is evaluated and the cache
written again.

Examples:
  yi-local run Yi-6B-Chat-Q4_K_M.gguf "Write a haiku about the sea"
  echo "你好" | yi-local run Yi-6B-Chat-Q4_K_M.gguf --system "Answer in one sentence."
  yi-local run Yi-6B-Q4_K_M.gguf --raw "The capital of France is" --max-tokens 8
  yi-local run Yi-6B-Chat-Q4_K_M.gguf --system "$(cat report.txt)" --prompt-cache report.kv "Summarize it"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p.add_argument("--prompt-cache", type=Path, default=None, metavar="FILE",
                   help="reuse the prompt's KV cache saved in FILE by an earlier run (as far as the prompts agree), "
                   "and save this prompt's there")  # fmt: skip
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
    if args.prompt_cache is not None:
        _check_cache_path(args.prompt_cache)
    model, backend_name = resolve_model(args)
    if args.prompt_cache is not None:
        _check_cache_use(args.prompt_cache, model, backend_name)
    backend = load_backend(model, options, backend=backend_name)
    info = backend.info
    print(f"yi-local: {info.name} · {info.quantization} · {info.offload} · ctx {info.n_ctx}", file=sys.stderr)
    for note in info.notes:
        print(f"yi-local: note: {note}", file=sys.stderr)
    cached = _restore(backend, args.prompt_cache) if args.prompt_cache is not None else None
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
    sys.stdout.flush()
    if args.prompt_cache is not None and cached != tokens:
        _store(backend, args.prompt_cache, len(tokens))
    if finish is not None and args.verbose_timings:
        t = finish.timings
        print(f"[{finish.reason}] prompt {t.evaluated_tokens} tok at {t.prompt_tps:.1f} tok/s, "
              f"generated {t.sampled_tokens} tok at {t.generate_tps:.1f} tok/s", file=sys.stderr)  # fmt: skip
    return 0


def _check_cache_path(path: Path) -> None:
    """Refuse, before anything is pulled or loaded, a --prompt-cache that cannot work or would overwrite a
    file that is not a prompt cache: FILE and FILE.meta must be new, or a cache and its meta."""
    import stat

    from yi_local.errors import YiLocalError
    from yi_local.runtime.kv_state import meta_path, read_meta_file

    hint = "give a new file name, e.g. --prompt-cache doc.kv"
    if path.is_dir():
        raise YiLocalError(f"--prompt-cache {path} is a folder", hint=hint)
    if not path.parent.is_dir():
        raise YiLocalError(f"--prompt-cache {path}: the folder {path.parent} does not exist",
                           hint="create it, or give a file in an existing folder")  # fmt: skip
    meta = meta_path(path)
    for p in (path, meta):
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) and not (p == path and stat.S_ISLNK(st.st_mode)):
            raise YiLocalError(f"--prompt-cache: {p} exists and is not a regular file", hint=hint)
    if meta.exists() or meta.is_symlink():
        try:
            read_meta_file(meta)
        except (OSError, ValueError, RecursionError):
            raise YiLocalError(f"--prompt-cache {path}: {meta} exists and is not a prompt cache's",
                               hint=hint) from None  # fmt: skip
    elif path.exists() and path.stat().st_size > 0:  # not one of ours: never overwrite a file the user may care about
        raise YiLocalError(f"--prompt-cache {path} exists and is not a prompt cache (it has no {meta.name})", hint=hint)


def _check_cache_use(path: Path, model: str, backend_name: str) -> None:
    import os

    from yi_local.errors import YiLocalError

    if backend_name != "llama.cpp":
        raise YiLocalError("--prompt-cache saves llama.cpp's KV cache; the transformers backend has none to save",
                           hint="leave out --prompt-cache, or run a GGUF")  # fmt: skip
    if path.exists() and os.path.samefile(path, model):
        raise YiLocalError(f"--prompt-cache {path} is the model file", hint="give a new file name, e.g. --prompt-cache doc.kv")


def _restore(backend, path: Path) -> list[int] | None:
    """The prompt cache's tokens, now in the model's KV cache; None (with a note) when it is not used."""
    from yi_local.runtime.kv_state import StateUnusable, load_state

    if not path.exists():
        return None
    try:
        loaded = load_state(backend, path, what="the cache")
    except StateUnusable as e:
        print(f"yi-local: note: the prompt cache {path} was not used: {e.message}; it is written again",
              file=sys.stderr)  # fmt: skip
        return None
    return loaded.tokens


def _store(backend, path: Path, n_prompt: int) -> None:
    """Save the prompt's KV cache (not the reply's) to `path`; a note when it cannot be."""
    from yi_local.errors import YiLocalError
    from yi_local.runtime.kv_state import save_state

    try:
        save_state(backend, path, max_bytes=1 << 62, keep=n_prompt)
    except YiLocalError as e:  # StateUnusable, a full disk
        print(f"yi-local: note: the prompt cache {path} was not saved: {e.message}", file=sys.stderr)
