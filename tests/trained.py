"""A tiny Yi-shaped chat model TRAINED on the calibration text: real activations for imatrix tests.

Random weights give every input channel the same scale, so an importance matrix has nothing to find.
This model is `tests.synthetic`'s "chat" layout (same config, tokenizer_config, special tokens, chat
template, bf16 safetensors shards) at hidden 256 / ffn 512, with a SentencePiece tokenizer trained on
yi_local/texts/calibration.txt, and weights trained on that text with torch for a fixed number of steps
(about a minute on two cores). Never on heldout.txt: that is the evaluation text.

The training is deterministic (fixed seeds, thread count and deterministic algorithms) and cached per
machine under $YI_LOCAL_TEST_CACHE, else $XDG_CACHE_HOME/yi-local-tests, else ~/.cache/yi-local-tests,
in a folder named by a hash of the text, the training code here and the synthetic.py code it uses, the
recipe and the torch / transformers / sentencepiece versions. A build happens in a scratch folder renamed
into place, under a file lock, so concurrent test processes wait for one build instead of corrupting it.
Entries unused for 30 days are removed when a new one is built.

    python -m tests.trained [--text FILE] [--out DIR] [--outliers]   # build (cached, or at DIR) and report
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tests import synthetic
from tests.synthetic import (
    Dims,
    f32_to_bf16,
    fit_vocab,
    tensor_shapes,
    train_tokenizer,
    write_model_files,
    write_shards,
)

REPO = Path(__file__).parent.parent
CALIBRATION = REPO / "yi_local" / "texts" / "calibration.txt"
HELDOUT = REPO / "yi_local" / "texts" / "heldout.txt"  # evaluation only: never trained on
CACHE_ENV = "YI_LOCAL_TEST_CACHE"

# Multiples of 256 so llama.cpp's k-quants and IQ quants really apply (it falls back to legacy types otherwise).
DIMS = Dims(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=1024)


@dataclass(frozen=True)
class Recipe:
    steps: int = 300
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3  # peak; linear warmup, then cosine down to lr * final_lr
    warmup: int = 30
    final_lr: float = 0.1
    weight_decay: float = 0.1  # matrices only, not norms
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    seed: int = 0
    threads: int = 2
    # Calibration has ~1200 distinct Chinese characters: at full coverage they alone would overflow 1024
    # pieces. 0.98 (SentencePiece's lowest) keeps ~530 of them; the rarest are spelled in bytes, as in Yi.
    tokenizer_vocab: int = 1024
    character_coverage: float = 0.98


RECIPE = Recipe()


# --- cache ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where trained checkpoints are kept between test runs (not YI_LOCAL_HOME/HF_HOME: tests point those at temp dirs)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "yi-local-tests"


def cache_key(text: bytes, recipe: Recipe = RECIPE, dims: Dims = DIMS) -> str:
    """A hash of everything the checkpoint's bytes depend on."""
    from importlib.metadata import version

    parts = [text, *(inspect.getsource(f).encode() for f in _TRAINING_CODE),
             repr(synthetic.SPECIAL_PIECES).encode(), synthetic.YI_CHAT_TEMPLATE.encode(),
             repr(recipe).encode(), repr(dims).encode(),
             *(f"{p}={version(p)}".encode() for p in ("torch", "transformers", "sentencepiece"))]  # fmt: skip
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def trained_checkpoint(
    text: Path = CALIBRATION, cache: Path | None = None, recipe: Recipe = RECIPE, dims: Dims = DIMS
) -> Path:
    """The trained checkpoint folder for `text` in `cache` (default `cache_root()`), built once. Read-only."""
    from filelock import FileLock

    data = Path(text).read_bytes()
    root = cache or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    name = f"trained-{cache_key(data, recipe, dims)}"
    final = root / name
    if not final.is_dir():
        with FileLock(str(root / f"{name}.lock"), timeout=1800):
            if not final.is_dir():
                for stale in root.glob(f".{name}-*"):  # left by a killed build: we hold the lock, so none is live
                    shutil.rmtree(stale, ignore_errors=True)
                scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
                try:
                    build_trained(scratch / "model", data, recipe, dims)
                    (scratch / "model").rename(final)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                _prune(root, keep=final)
    try:
        os.utime(final)  # its age says when it was last used
    except OSError:
        pass
    return final


def _prune(root: Path, keep: Path, days: float = 30) -> None:
    """Remove the entries (for older texts or code) that no test has used for `days`."""
    cutoff = time.time() - days * 86400
    for entry in root.glob("trained-*"):
        if entry != keep and entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            entry.with_name(entry.name + ".lock").unlink(missing_ok=True)


# --- training ------------------------------------------------------------------------------------------


@contextmanager
def _deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Fixed seed, thread count and deterministic kernels, restored afterwards (the test process shares them)."""
    import torch

    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every new tensor costs a third
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill_before
            torch.use_deterministic_algorithms(det_before)
            torch.set_num_threads(threads_before)


def _scrub_tokenizer(model: Path, text_name: str) -> None:
    """SentencePiece records the training file's and output's paths in the model: make them the same every build."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.input[:] = [text_name]
    proto.trainer_spec.model_prefix = "tokenizer"
    model.write_bytes(proto.SerializeToString())


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (recipe.final_lr + (1 - recipe.final_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def build_trained(
    out_dir: Path,
    text: bytes | Path = CALIBRATION,
    recipe: Recipe = RECIPE,
    dims: Dims = DIMS,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train and write the checkpoint at `out_dir` (uncached; `trained_checkpoint` is the cached way)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    data = text if isinstance(text, bytes) else Path(text).read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.txt"  # trained from these bytes, even if the file changes meanwhile
        corpus.write_bytes(data)
        tokenizer = train_tokenizer(
            corpus, out_dir, recipe.tokenizer_vocab, character_coverage=recipe.character_coverage
        )
    _scrub_tokenizer(tokenizer, corpus.name)
    dims = fit_vocab(dims, tokenizer)
    write_model_files(out_dir, dims, "chat")
    ids = np.array(spm.SentencePieceProcessor(model_file=str(tokenizer)).encode(data.decode()), dtype=np.int64)
    if len(ids) <= recipe.seq + 1:
        raise ValueError(f"the training text is {len(ids)} tokens; it must be longer than {recipe.seq + 1}")

    config = LlamaConfig.from_pretrained(out_dir)  # exactly what loading the folder gives
    config._attn_implementation = "eager"  # on CPU, twice as fast to train at this size as sdpa
    with _deterministic_torch(recipe.seed, recipe.threads):
        model = LlamaForCausalLM(config).float()
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, foreach=False)
        stream = torch.from_numpy(ids)
        gen = torch.Generator().manual_seed(recipe.seed)
        offsets = torch.arange(recipe.seq + 1)
        model.train()
        start = time.monotonic()
        losses = []
        for step in range(recipe.steps):
            starts = torch.randint(0, len(ids) - recipe.seq - 1, (recipe.batch, 1), generator=gen)
            batch = stream[starts + offsets]
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
            opt.step()
            losses.append(loss.item())
            if log and (step % 10 == 0 or step == recipe.steps - 1):
                elapsed = time.monotonic() - start
                log(f"step {step:4d}  loss {losses[-1]:.3f}  lr {_lr_at(step, recipe):.2e}  {elapsed:5.1f}s")
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    shapes = list(tensor_shapes(dims, "chat"))
    if set(state) != {n for n, _ in shapes}:
        raise RuntimeError(f"unexpected tensors: {sorted(set(state) ^ {n for n, _ in shapes})}")
    for name, shape in shapes:
        assert state[name].shape == shape, (name, state[name].shape, shape)
    write_shards(out_dir, shapes, lambda name, shape: f32_to_bf16(state[name]), shards=2)
    summary = {"recipe": asdict(recipe), "tokens": len(ids), "final_loss": round(float(np.mean(losses[-10:])), 4)}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return out_dir


# What the checkpoint's bytes depend on, taken at import (so a test that monkeypatches one sees the same key).
_TRAINING_CODE = (build_trained, _deterministic_torch, _scrub_tokenizer, _lr_at, Recipe,
                  train_tokenizer, fit_vocab, write_model_files, write_shards, tensor_shapes, f32_to_bf16,
                  synthetic.write_safetensors, synthetic._config, synthetic._tokenizer_config)  # fmt: skip


# --- measurements --------------------------------------------------------------------------------------


def unigram_entropy(ids: np.ndarray) -> float:
    """Nats per token of the best context-free model of `ids` (the bar a trained model must clear)."""
    counts = np.bincount(ids).astype(np.float64)
    p = counts[counts > 0] / len(ids)
    return float(-(p * np.log(p)).sum())


def channel_energy(model_dir: Path, text: bytes, max_tokens: int = 4096, seq: int = 128) -> dict[str, np.ndarray]:
    """The mean squared input of each column of every q_proj, gate_proj and down_proj, over `text`.

    This is what llama.cpp's imatrix collects: the weight each column's quantization error gets.
    """
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    ids = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).encode(text.decode())[:max_tokens]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "gate_proj", "down_proj")):

            def hook(_m, inputs, _out, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(ids) - 1, seq):
            model(torch.tensor([ids[i : i + seq]]))
    for h in hooks:
        h.remove()
    return {name: (s / len(ids)).numpy() for name, s in sums.items()}


def channel_outliers(model_dir: Path, text: bytes, max_tokens: int = 4096) -> dict[str, list[float]]:
    """For q_proj, gate_proj and down_proj, by layer: max / median over columns of the mean squared input.

    Near 1, every column matters alike and an importance matrix cannot help; large, a few columns
    dominate the quantization error.
    """
    out: dict[str, list[float]] = {}
    for name, energy in channel_energy(model_dir, text, max_tokens).items():
        out.setdefault(name.rsplit(".", 1)[-1], []).append(float(energy.max() / np.median(energy)))
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=CALIBRATION)
    parser.add_argument("--out", type=Path, help="build here, uncached (default: the cache)")
    parser.add_argument("--steps", type=int, default=RECIPE.steps)
    parser.add_argument("--outliers", action="store_true", help="measure per-channel activation outliers")
    parser.add_argument("--eval", type=Path, default=HELDOUT, help="the text to measure outliers on (heldout.txt)")
    args = parser.parse_args()
    from dataclasses import replace

    recipe = replace(RECIPE, steps=args.steps)
    start = time.monotonic()
    if args.out:
        folder = build_trained(args.out, args.text, recipe, log=print)
    else:
        folder = trained_checkpoint(args.text, recipe=recipe)
    print(f"{folder}  ({time.monotonic() - start:.1f}s)")
    if args.outliers:
        for kind, ratios in channel_outliers(folder, args.eval.read_bytes()).items():
            print(f"{kind:10s} max/median mean x^2 per column, by layer: " + " ".join(f"{r:7.1f}" for r in ratios))


if __name__ == "__main__":
    main()


def add_outlier_channels(model_dir: Path, n_channels: int = 8, scale: float = 8.0, seed: int = 0) -> None:
    """Give the checkpoint at `model_dir` the outlier features of real LLMs, without changing what it computes.

    A minute of training grows outliers only at down_proj's input; real models also have a few hidden
    channels whose RMSNorm gain is 10-100x the rest ("massive activations"), and those make importance
    matrices pay off at every level. So `n_channels` channels of every input/post-attention norm gain are
    multiplied by `scale` and the matching input columns of the q/k/v and gate/up projections divided by
    it: the same function (up to bf16 rounding), with outlier activations. In place.
    """
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    channels = torch.from_numpy(np.random.default_rng(seed).choice(config["hidden_size"], n_channels, replace=False))
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, t in tensors.items():
            w = t.float()
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                w[channels] *= scale
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                w[:, channels] /= scale
            tensors[name] = w.to(t.dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
