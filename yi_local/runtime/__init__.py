"""The runtime: backends that load a model and yield one stream of typed generation events."""

from yi_local.runtime.events import Event, Finish, TextDelta, Timings, Usage
from yi_local.runtime.params import LoadOptions, SamplingParams

__all__ = ["Event", "Finish", "LoadOptions", "SamplingParams", "TextDelta", "Timings", "Usage", "load_backend"]


def load_backend(model: str, options: LoadOptions | None = None, backend: str = "llama.cpp"):
    """Open `model` with the named backend (imported lazily: llama_cpp and torch are heavy)."""
    options = options or LoadOptions()
    options.validate()
    if backend == "llama.cpp" and options.rpc:
        from yi_local.runtime.supervised import SupervisedBackend

        return SupervisedBackend(model, options)
    if backend == "llama.cpp":
        from yi_local.runtime.llama_cpp_backend import LlamaCppBackend

        return LlamaCppBackend(model, options)
    if backend == "transformers":
        from yi_local.runtime.transformers_backend import TransformersBackend

        return TransformersBackend(model, options)
    from yi_local.errors import YiLocalError

    raise YiLocalError(f"unknown backend {backend!r}", hint="use --backend llama.cpp or --backend transformers")
