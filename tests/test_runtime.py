"""Process-level settings stay out of the model: the allocator set-up of entry points (`deepencoder.runtime`), and a
model layer that never pulls in the training stack."""

import subprocess
import sys
import textwrap

import pytest

from deepencoder import runtime


def _python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


# the module alone, without `import deepencoder` (and transformers) in every child process
LOAD_RUNTIME = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("runtime", {runtime.__file__!r})
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
"""


def test_tuned_glibc_stops_mmap_for_large_blocks():
    """After `tune_glibc` a 64 MB block comes from the heap; glibc's default serves it by mmap (mallinfo2's
    `hblkhd`: bytes in mmapped blocks)."""
    code = """
        import ctypes
        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.mallinfo2.restype = MallInfo2
        tuned = runtime.tune_glibc() if TUNE else False
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(64 * 2**20)
        print(tuned, runtime.active(), libc.mallinfo2().hblkhd - before)
    """
    env = runtime.environment("glibc")
    plain = _python(LOAD_RUNTIME + "TUNE = False\n" + textwrap.dedent(code), env).split()
    tuned = _python(LOAD_RUNTIME + "TUNE = True\n" + textwrap.dedent(code), env).split()
    assert plain[:2] == ["False", "glibc"] and int(plain[2]) >= 64 * 2**20  # glibc's default: an mmapped block
    assert tuned[:2] == ["True", "glibc-tuned"] and int(tuned[2]) == 0


@pytest.mark.parametrize("name", runtime.available())
def test_environment_gives_the_child_that_allocator(name):
    assert _python(LOAD_RUNTIME + "print(runtime.active())", runtime.environment(name)) == name


def test_configure_allocator_picks_the_best_available_and_respects_system():
    env = runtime.environment("glibc")
    env.pop(runtime.ENV_CHOICE)
    expected = "tcmalloc" if runtime.find_library("tcmalloc") else "glibc-tuned"
    code = LOAD_RUNTIME + "print(runtime.configure_allocator())"
    assert _python(code, env) == expected  # re-executes itself with tcmalloc preloaded when installed
    assert _python(code, {**env, runtime.ENV_CHOICE: "system"}) == "glibc"
    assert _python(code, {**env, runtime.ENV_CHOICE: "glibc-tuned"}) == "glibc-tuned"
    with pytest.raises(ValueError, match="choose from"):
        runtime.environment("mimalloc")


def test_freeze_never_imports_the_training_stack():
    """`import deepencoder` and `model.freeze(...)` load neither deepencoder.training nor peft, and freezing imports
    nothing at all (yaml arrives with huggingface_hub, which transformers imports, so it is checked as 'nothing new')."""
    code = """
        import sys
        import deepencoder
        from deepencoder import DeepEncoderConfig, DeepEncoderModel
        config = DeepEncoderConfig(
            sam_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                            window_size=4, image_size=128, out_channels=16, compressor_channels=[16, 32]),
            clip_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        )
        model = DeepEncoderModel(config)
        before = set(sys.modules)
        changed = model.freeze("sam") + model.freeze("clip.layers.0") + model.unfreeze("sam.blocks.1")
        print(changed > 0, sorted(set(sys.modules) - before),
              [name for name in ("deepencoder.training", "peft") if name in sys.modules])
    """
    assert _python(code, runtime.environment("glibc")) == "True [] []"
