"""On a model with real activation outliers, the importance matrix pays off.

The model is trained at test time (tests/trained.py, cached) and given the few outlier hidden channels
real LLMs have by a function-preserving rescale (`add_outlier_channels`): a minute of training grows
outliers only at down_proj's input, which Q2_K keeps at Q3_K, and there the matrix changes KL by 2%.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.convert import convert, requantize
from converters.importance import ImatrixRequest
from yi_local.quality import measure_quality


@pytest.fixture(scope="module")
def trained(trained_dir, tmp_path_factory):
    """The trained model's F16, and Q2_K / IQ2_XXS made from it with and without a matrix on the packaged text."""
    import shutil

    from tests.trained import add_outlier_channels

    model = Path(shutil.copytree(trained_dir, tmp_path_factory.mktemp("outliers") / trained_dir.name))
    add_outlier_channels(model)
    out = tmp_path_factory.mktemp("trained-quants")
    f16 = convert(model, out=out, outtype="f16").files[0]
    (out / "plain").mkdir()
    (out / "weighted").mkdir()
    plain = requantize(f16, out / "plain", ["Q2_K"], threads=2).files[0]
    weighted = requantize(f16, out / "weighted", ["Q2_K", "IQ2_XXS"], threads=2, imatrix=ImatrixRequest(compute=True))
    return f16, plain, weighted


def test_q2_k_with_the_matrix_is_closer_to_f16_on_held_out_text(trained):
    f16, plain, weighted = trained
    q2_matrix, iq2 = weighted.files
    report = measure_quality([plain, q2_matrix, iq2], f16, ctx=256, threads=2)  # the packaged held-out text
    rows = {r.path: r for r in report.rows}
    without, with_matrix = rows[str(plain)], rows[str(q2_matrix)]
    # Measured: KL 0.104 without, 0.066 with the matrix (held-out text, windows of 256).
    assert with_matrix.kld_mean < 0.8 * without.kld_mean, (with_matrix.kld_mean, without.kld_mean)
    assert with_matrix.top1 >= without.top1
    assert weighted.imatrix == weighted.files[0].parent / "Yi-Tiny-Trained.imatrix.gguf" and weighted.imatrix.is_file()
    # The 2-bit IQ level, which needs the matrix, is a usable model: far closer to F16 than chance.
    assert rows[str(iq2)].kld_mean < 1.0 and rows[str(iq2)].top1 > 0.3


def test_an_iq_level_of_the_trained_model_generates(trained):
    from yi_local.runtime.events import Finish, TextDelta
    from yi_local.runtime.llama_cpp_backend import LlamaCppBackend
    from yi_local.runtime.params import LoadOptions, SamplingParams

    _, _, weighted = trained
    backend = LlamaCppBackend(weighted.files[1], LoadOptions(n_ctx=256, n_threads=2))
    try:
        # The model was trained on plain text (no chat turns): a plain-text prompt.
        prompt = backend.tokenize("A language model predicts the next")
        events = list(backend.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0)))
    finally:
        backend.close()
    assert isinstance(events[-1], Finish) and events[-1].usage.completion_tokens > 0
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
