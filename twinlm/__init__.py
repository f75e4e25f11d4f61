"""twinlm: one transformer graph, run on MLX or tinygrad, with the two backends proven equal.

    import twinlm
    m = twinlm.load("runs/mine")      # or a Hugging Face model folder
    print(m.generate("Once", max_new_tokens=40))

See `twinlm.api` for `load`, `train` and `Model`; `twinlm.trainer.Trainer` for the training loop itself.
"""

from typing import Any

from twinlm._version import __version__

__all__ = ["Model", "load", "train", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import twinlm` stays cheap and loads no framework
    if name in __all__:
        from twinlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'twinlm' has no attribute {name!r}")
