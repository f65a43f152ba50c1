"""sdelang: declare a forward SDE, get its score-based diffusion machinery as a PyTorch module.

    import sdelang
    sde = sdelang.load("examples/vp.sde", beta_max=30)   # a torch.nn.Module
    mean, std = sde.marginal_prob(x0, t)

Layout: the compiler (compiler/: parse -> check -> derive -> codegen, driven by compiler/__init__.py)
writes a standalone module; the runtime (runtime/: models, losses, sampling, likelihood, data,
training, evaluate, plots) uses it and imports torch on demand; cli/ is the command line, verify/ the
numerical checks of `sdelang check`, interop/ the adapters to other libraries.
"""
__version__ = "0.1.0"

from .compiler import Compiled, compile_file, compile_source  # noqa: E402
from .errors import InternalCompilerError, SdeError, Source  # noqa: E402
from .loader import load, load_module  # noqa: E402

__all__ = ["Compiled", "InternalCompilerError", "SdeError", "Source", "__version__", "compile_file",
           "compile_source", "load", "load_module"]
