"""Registering the towers with transformers' Auto classes without importing transformers first.

`import deepencoder` must stay cheap (the console script answers `--help` at once), yet `AutoConfig`, `AutoModel` and
`AutoImageProcessor` must know both towers after it. Each registration therefore waits for the transformers module it
registers with (`configuration_auto`, `modeling_auto`, `image_processing_auto`): when that module is already imported
it runs at once, otherwise an import hook (a finder at the head of `sys.meta_path`) runs it right after the module is
executed. A registration imports model classes, so it also waits while any transformers or deepencoder module is
half-imported (transformers imports `configuration_auto` from inside its own `modeling_utils`, and `modeling_auto`
may be imported from inside one of the model files): it then runs at the next import the hook sees, or when a
public name of the package is first used. The hook removes itself once everything is registered.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _register_configs() -> None:
    from transformers import AutoConfig

    from .configuration_deepencoder import DeepEncoderConfig
    from .configuration_deepencoder_v2 import DeepEncoderV2Config

    for config in (DeepEncoderConfig, DeepEncoderV2Config):
        AutoConfig.register(config.model_type, config, exist_ok=True)


def _register_models() -> None:
    from transformers import AutoModel

    from .configuration_deepencoder import DeepEncoderConfig
    from .configuration_deepencoder_v2 import DeepEncoderV2Config
    from .modeling_deepencoder import DeepEncoderModel
    from .modeling_deepencoder_v2 import DeepEncoderV2Model

    AutoModel.register(DeepEncoderConfig, DeepEncoderModel, exist_ok=True)
    AutoModel.register(DeepEncoderV2Config, DeepEncoderV2Model, exist_ok=True)


def _register_image_processor() -> None:
    from transformers import AutoImageProcessor

    from .configuration_deepencoder import DeepEncoderConfig
    from .configuration_deepencoder_v2 import DeepEncoderV2Config
    from .image_processing_deepencoder import DeepEncoderImageProcessor

    for config in (DeepEncoderConfig, DeepEncoderV2Config):
        AutoImageProcessor.register(config, image_processor_classes={"pil": DeepEncoderImageProcessor}, exist_ok=True)


# transformers' auto module -> the registration that runs once it is imported
AUTO_REGISTRATIONS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_configs,
    "transformers.models.auto.modeling_auto": _register_models,
    "transformers.models.auto.image_processing_auto": _register_image_processor,
}
_WATCHED = ("transformers.", "deepencoder.")


def register_auto_classes() -> None:
    """Register both towers, their configs and the image processor with transformers' Auto classes now (idempotent;
    imports transformers' auto classes)."""
    for register in AUTO_REGISTRATIONS.values():
        register()


class _Hook(importlib.abc.MetaPathFinder):
    """The finder: wraps the loaders of transformers' auto modules and of this package's modules, and runs the
    registrations that are due whenever no watched module is half-imported."""

    def __init__(self) -> None:
        self.waiting = {name: register for name, register in AUTO_REGISTRATIONS.items() if name not in sys.modules}
        self.due = [register for name, register in AUTO_REGISTRATIONS.items() if name in sys.modules]
        self.lock = threading.RLock()
        self.running = False

    @property
    def done(self) -> bool:
        return not self.waiting and not self.due

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        self.run_due()
        if not fullname.startswith(_WATCHED) or self.done:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and (fullname in self.waiting or fullname.startswith("deepencoder.")):
                spec.loader = _Loader(spec.loader, self, fullname)
            return spec
        return None

    def executed(self, fullname: str, module: ModuleType) -> None:
        register = self.waiting.pop(fullname, None)
        if register is not None:
            self.due.append(register)
        self.run_due(executing=module)

    def run_due(self, executing: ModuleType | None = None) -> None:
        """Run the due registrations unless a watched module (other than the one whose execution just ended) is
        half-imported, or a registration is already running on this thread."""
        if not self.due:
            return
        with self.lock:
            if self.running or _half_imported(executing):
                return
            self.running = True
            try:
                while self.due:
                    self.due.pop(0)()
            finally:
                self.running = False
            if self.done:
                sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]


class _Loader(importlib.abc.Loader):
    """A module's own loader, then `_Hook.executed`."""

    def __init__(self, loader: Any, hook: _Hook, fullname: str) -> None:
        self.loader, self.hook, self.fullname = loader, hook, fullname

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.hook.executed(self.fullname, sys.modules.get(self.fullname, module))

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the wrapped loader
        return getattr(self.loader, name)


def _half_imported(executing: ModuleType | None) -> bool:
    for name, module in list(sys.modules.items()):
        if module is executing or not name.startswith(_WATCHED):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def install_auto_registration() -> None:
    """Register now what transformers has already imported, and install the hook for the rest (idempotent)."""
    if any(isinstance(finder, _Hook) for finder in sys.meta_path):
        return
    hook = _Hook()
    hook.run_due()
    if not hook.done:
        sys.meta_path.insert(0, hook)


def run_due_registrations() -> None:
    """Run the registrations waiting for a half-imported module to finish (a public name's first use calls this)."""
    for finder in list(sys.meta_path):
        if isinstance(finder, _Hook):
            finder.run_due()
