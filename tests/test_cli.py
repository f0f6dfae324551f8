"""The console script's start-up: parsing a command imports neither torch nor transformers (`deepencoder encode
--help` answers at once), only the invoked command's module is loaded, importing the package still registers the
towers with transformers' Auto classes (whichever is imported first), and a GPU run is never re-executed for an
allocator."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

from deepencoder.cli import COMMANDS, build_parser, cuda_run, invoked_command

HEAVY = ("torch", "transformers", "torchvision", "numpy", "PIL", "fsspec", "safetensors")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("command", sorted({"encode", "plan", "convert"}))
def test_parsing_a_command_imports_nothing_heavy(command):
    """The package, the console script and the command's whole parser (`--help` prints it) load without torch,
    transformers, numpy or PIL; another command's module is not imported."""
    argv = {
        "encode": ["encode", "in.pdf", "--out", "out", "--mode", "auto", "--dtype", "bf16", "--revision", "main"],
        "plan": ["plan", "in.pdf", "--json"],
        "convert": ["convert", "deepseek-ocr", "src", "dst", "--dtype", "bf16"],
    }[command]
    others = [COMMANDS["export-onnx"][0]]  # a command module that imports the model at once: never loaded here
    code = f"""
        import sys
        from deepencoder.cli import build_parser, invoked_command
        argv = {argv!r}
        args = build_parser([invoked_command(argv)]).parse_args(argv)
        assert callable(args.func)
        print([m for m in {HEAVY + tuple(others)!r} if m in sys.modules])
    """
    assert _python(code) == "[]"


def test_help_is_the_full_parser_of_the_command():
    """`deepencoder encode --help`, run as the console script runs it, prints the encode options (its own, the hub's
    and the automatic mode's) without importing torch."""
    code = """
        import sys
        from deepencoder.cli import main
        sys.argv = ["deepencoder", "encode", "--help"]
        try:
            main()
        except SystemExit as exit:
            assert exit.code == 0
        print(sorted(m for m in ("torch", "transformers", "deepencoder.export") if m in sys.modules))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert all(flag in result.stdout for flag in ("--compute-dtype", "--max-compression", "--revision"))
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_listed_help_lines_are_the_commands_own():
    """`deepencoder --help` lists every command from the table without importing it; each line equals the help the
    command's own module registers."""
    full = build_parser()
    listed = build_parser([])
    helps = {
        parser: {
            action.dest: action.help
            for action in next(a for a in parser._actions if a.dest == "command")._choices_actions
        }
        for parser in (full, listed)
    }
    assert helps[full] == helps[listed] == {name: help_line for name, (_, help_line) in COMMANDS.items()}


def test_invoked_command_and_gpu_runs():
    assert invoked_command(["encode", "x", "--out", "y"]) == "encode"
    assert invoked_command(["--version"]) is None and invoked_command(["nonsense"]) is None
    assert cuda_run(argparse.Namespace(device="cuda:1")) and not cuda_run(argparse.Namespace(device="cpu"))
    assert not cuda_run(argparse.Namespace(command="convert"))  # commands without --device run on the host


def test_v2_model_type_read_without_the_config():
    """The encode command tells a V2 tower by its model type without importing the config class."""
    from deepencoder import DeepEncoderV2Config
    from deepencoder.pipeline.cli import V2_MODEL_TYPE

    assert V2_MODEL_TYPE == DeepEncoderV2Config.model_type


CHECK_AUTO = """
from transformers import AutoConfig, AutoModel
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
names = []
for model_type in ("deepencoder", "deepencoder_v2"):
    config = type(AutoConfig.for_model(model_type))
    names += [config.__name__, AutoModel._model_mapping[config].__name__, IMAGE_PROCESSOR_MAPPING[config]["pil"].__name__]
print(names)
"""
REGISTERED = (
    "['DeepEncoderConfig', 'DeepEncoderModel', 'DeepEncoderImageProcessor', "
    "'DeepEncoderV2Config', 'DeepEncoderV2Model', 'DeepEncoderImageProcessor']"
)


@pytest.mark.parametrize(
    "imports",
    [
        "import deepencoder",  # transformers' auto classes imported after the package
        "import transformers.models.auto.modeling_auto, transformers.models.auto.image_processing_auto\n"
        "import deepencoder",  # ... or before it
        "import deepencoder\nimport transformers.modeling_utils",  # imports configuration_auto half-way through
        "from deepencoder import DeepEncoderModel",  # a model file imports an auto module half-way through
        "from deepencoder.modeling_deepencoder_v2 import DeepEncoderV2Model",
    ],
)
def test_auto_classes_registered_in_any_import_order(imports):
    """AutoConfig / AutoModel / AutoImageProcessor know both towers whatever was imported first, including when
    transformers imports its auto modules while one of its own modules or a model file is half-imported."""
    assert _python(f"{imports}\n{CHECK_AUTO}") == REGISTERED


def test_converting_loaders_registered_by_a_submodule_import():
    """`from deepencoder.modeling_deepencoder import DeepEncoderModel` (not the package's names) still finds the
    conversion layer's loaders: importing the package registers them, without importing the converters."""
    code = """
        import sys
        from deepencoder.modeling_utils import CHECKPOINT_LOADERS
        print(sorted(CHECKPOINT_LOADERS), "deepencoder.conversion.load" in sys.modules)
    """
    assert _python(code) == "['deepseek-ocr', 'deepseek-ocr2', 'pretrained', 'transformers'] False"


def test_cli_threads_reach_the_run_and_local_options_are_refused_with_ray(tmp_path, capsys):
    from deepencoder.cli import build_parser, main
    from deepencoder.pipeline.cli import _options

    args = build_parser().parse_args(["encode", "x.pdf", "--out", str(tmp_path / "o"), "--threads", "1"])
    assert _options(args).threads == 1
    base = ["encode", str(tmp_path / "x.pdf"), "--out", str(tmp_path / "o"), "--engine", "ray"]
    for flags in (["--views-per-call", "2"], ["--threads", "1"], ["--compile"]):
        assert main([*base, *flags]) == 2  # refused before Ray is started
        assert f"error: {flags[0]}: options of the local engine" in capsys.readouterr().err
    local = ["encode", str(tmp_path / "x.pdf"), "--out", str(tmp_path / "o")]
    for flags, message in ((["--threads", "0"], "--threads must be at least 1, got 0"),
                           (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--prefetch", "-1"], "--prefetch must be at least 1, got -1"),
                           (["--workers", "-2"], "--workers must be at least 0, got -2"),
                           (["--pages", "1-x"], "bad page range '1-x'")):  # fmt: skip
        assert main([*local, *flags]) == 2  # before the tower loads and the folder is locked
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_encode_prestarts_page_workers_for_its_device_first(tmp_path, monkeypatch):
    """`deepencoder encode` asks for its page workers' start before it imports torch or loads the tower (a CUDA run's
    forkserver imports beside it), on the device `--device` names; the Ray engine has no local workers."""
    from deepencoder.cli import main
    from deepencoder.pipeline import producer

    class Stop(Exception):
        pass

    calls = []

    def prestart(device, workers):
        calls.append((device, workers, "deepencoder.pipeline.weights" in sys.modules))
        raise Stop

    monkeypatch.setattr(producer, "prestart_workers", prestart)
    monkeypatch.delitem(sys.modules, "deepencoder.pipeline.weights", raising=False)
    base = ["encode", str(tmp_path / "x.pdf"), "--out", str(tmp_path / "o")]
    for flags in (["--device", "cuda:1", "--workers", "3"], ["--device", "cpu", "--workers", "0"]):
        with pytest.raises(Stop):
            main([*base, *flags])
    assert calls == [("cuda", 3, False), ("cpu", 0, False)]
    assert main([*base, "--engine", "ray", "--threads", "1"]) == 2 and len(calls) == 2


def test_the_console_script_freezes_the_heap_before_the_interpreter_exits():
    """Run from the command line, a command's objects (torch's, transformers') are moved out of the collector's way
    when it returns, so the interpreter's exit does not walk them all (0.7 s of every `deepencoder encode` here);
    called from Python with an argv list, the process is left as it was."""
    code = """
        import gc, sys
        from deepencoder import cli
        before = gc.get_freeze_count()
        as_library = cli.main(["plan", "/nonexistent-folder"])
        after_library = gc.get_freeze_count()
        sys.argv = ["deepencoder", "plan", "/nonexistent-folder"]
        as_script = cli.main()
        print(before, after_library, gc.get_freeze_count() > 0, as_library == as_script != 0)
    """
    assert _python(code) == "0 0 True True"
