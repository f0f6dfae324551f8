"""Converted loads of hub checkpoints take `from_pretrained`'s arguments (`revision`, `cache_dir`,
`local_files_only`, `token`, `subfolder`, `force_download`) and go through the hub cache: a checkpoint in the
hub's cache layout (`models--org--name/{refs,snapshots,blobs}`) loads offline, and the byte ranges a first load
reads from the hub are kept there, so a second load reads nothing remote (a recording stand-in for the hub; no
network is used). Every converted entry point is exercised: `from_pretrained`, `from_deepseek_ocr`,
`from_deepseek_ocr2`, `deepencoder convert`, and the weights of `deepencoder encode`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.v2_support import seeded_state_dict, tiny_config_kwargs, to_deepseek_ocr2
from helpers import random_model
from PIL import Image
from safetensors.torch import load_file
from test_checkpoints import write_deepseek_checkpoint
from test_conversion_sources import CountingFileSystem

from deepencoder import DeepEncoderModel, DeepEncoderV2Config, DeepEncoderV2Model
from deepencoder.cli import main
from deepencoder.conversion import hub as hub_module
from deepencoder.conversion.hub import HubOptions, RemoteFile
from deepencoder.conversion.io import CheckpointError
from deepencoder.conversion.load import load_tower
from deepencoder.pipeline.weights import load_model

REPO = "org/DeepSeek-OCR"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DEEPSEEK_CONFIG = {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCRForCausalLM"]}


def deepseek_repository(model: DeepEncoderModel, root: Path) -> Path:
    """The repository's files: a DeepSeek-OCR-shaped checkpoint (two shards + index, language-model tensors beside
    the vision ones) and its config.json, in `sub/`."""
    write_deepseek_checkpoint(model, root / "sub")
    (root / "sub" / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    (root / "README.md").write_text("a model card\n")
    return root


def hub_cache_layout(repository: Path, cache: Path, repo_id: str, commit: str, refs: tuple[str, ...]) -> Path:
    """What `snapshot_download` leaves: blobs named by content hash, snapshot files linking to them, refs naming the
    commit."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in repository.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / file.relative_to(repository)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(file.relative_to(repository).parts) + 1), "blobs", blob.name))
        assert link.read_bytes() == data
    for ref in refs:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return folder


class RecordingRemote:
    """The hub, played by a local folder: `snapshot` lists it (sizes, content hashes as blob ids) and counts the
    calls; `read_range` reads through `CountingFileSystem`, which records every (offset, length) read."""

    def __init__(self, repository: Path, commit: str = COMMIT) -> None:
        self.repository, self.commit = repository, commit
        self.filesystem = CountingFileSystem()
        self.snapshots = 0

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, RemoteFile]]:
        self.snapshots += 1
        files = {}
        for file in self.repository.rglob("*"):
            if file.is_file():
                blob = hashlib.sha256(file.read_bytes()).hexdigest()
                files[file.relative_to(self.repository).as_posix()] = RemoteFile(file.stat().st_size, blob)
        return self.commit, files

    def read_range(self, repo_id: str, commit: str, path: str, start: int, end: int) -> bytes:
        assert commit == self.commit
        with self.filesystem.open(str(self.repository / path), "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)


@pytest.fixture
def no_hub(monkeypatch):
    """Any request to the real hub fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(hub_module.HubRemote, "snapshot", refuse)
    monkeypatch.setattr(hub_module.HubRemote, "read_range", refuse)


def assert_same_weights(loaded, model):
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_hub_cache_layout_loads_offline_with_revision_and_subfolder(tmp_path, monkeypatch, no_hub):
    """A DeepSeek-OCR checkpoint in the hub cache under `sub/` of revision `v1.0` loads with HF_HUB_OFFLINE=1 and
    local_files_only through every converted entry point; another revision is an error naming the cache."""
    model = random_model(seed=7)
    cache = tmp_path / "cache"
    hub_cache_layout(deepseek_repository(model, tmp_path / "repo"), cache, REPO, COMMIT, refs=("v1.0",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = dict(revision="v1.0", subfolder="sub", cache_dir=str(cache), local_files_only=True)

    assert_same_weights(DeepEncoderModel.from_pretrained(REPO, **hub), model)
    assert_same_weights(DeepEncoderModel.from_deepseek_ocr(REPO, **hub), model)
    assert_same_weights(DeepEncoderModel.from_pretrained(REPO, **{**hub, "revision": COMMIT}), model)
    loaded, description = load_model(REPO, hub=HubOptions(**hub))  # `deepencoder encode --weights`
    assert_same_weights(loaded, model)
    assert REPO in description
    out = tmp_path / "converted"
    flags = ["--revision", "v1.0", "--subfolder", "sub", "--cache-dir", str(cache), "--local-files-only"]
    assert main(["convert", "deepseek-ocr", REPO, str(out), *flags]) == 0
    assert_same_weights(DeepEncoderModel.from_pretrained(out), model)
    Image.new("RGB", (300, 200), "white").save(tmp_path / "page.png")
    encode_args = ["encode", str(tmp_path / "page.png"), "--weights", REPO, "--out", str(tmp_path / "tokens"), *flags]
    assert main([*encode_args, "--mode", "gundam", "--base-size", "256", "--tile-size", "128", "--no-progress"]) == 0
    tokens = load_file(str(tmp_path / "tokens" / "page.png.safetensors"))["page.0"]
    assert tokens.shape[1] == model.config.projector_dim

    with pytest.raises(CheckpointError, match="not in the hub cache"):
        DeepEncoderModel.from_deepseek_ocr(REPO, **{**hub, "revision": "v2.0"})
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):  # the repository's root holds no checkpoint
        DeepEncoderModel.from_deepseek_ocr(REPO, **{**hub, "subfolder": ""})


def test_first_load_ranges_serve_the_second_load(tmp_path, monkeypatch, no_hub):
    """A first load reads the vision tensors' ranges from the hub (not the language model's) and keeps them in the
    hub cache; a second load online resolves the revision and reads no byte; offline (HF_HUB_OFFLINE=1) it asks
    nothing at all, through `from_pretrained` and `from_deepseek_ocr`; `force_download` reads again."""
    model = random_model(seed=8)
    repository = deepseek_repository(model, tmp_path / "repo")
    cache = tmp_path / "cache"
    options = HubOptions(subfolder="sub", cache_dir=str(cache))
    monkeypatch.setattr(hub_module, "READ_AHEAD", 0)  # exact ranges: the tiny shards are smaller than the read-ahead

    remote = RecordingRemote(repository)
    first, _ = load_tower(REPO, hub=options, remote=remote)
    assert_same_weights(first, model)
    files = [file for file in (repository / "sub").iterdir()]
    language = model_language_bytes(repository / "sub")
    total = sum(file.stat().st_size for file in files)
    assert language > 0 and 0 < remote.filesystem.bytes_read <= total - language, (remote.filesystem.bytes_read, total)
    folder = cache / "models--org--DeepSeek-OCR"
    assert (folder / "refs" / "main").read_text() == COMMIT
    assert (folder / "ranges" / f"{COMMIT}.json").is_file()
    cached = sum(
        end - start
        for index in (folder / "ranges").glob("*.json")
        if "have" in (record := json.loads(index.read_text()))
        for start, end in record["have"]
    )
    assert cached == remote.filesystem.bytes_read  # each byte read once, and kept

    again = RecordingRemote(repository)
    second, _ = load_tower(REPO, hub=options, remote=again)
    assert_same_weights(second, model)
    assert again.filesystem.reads == [] and again.snapshots == 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real hub (refused by `no_hub`) is the default remote
    assert_same_weights(DeepEncoderModel.from_deepseek_ocr(REPO, subfolder="sub", cache_dir=str(cache)), model)
    assert_same_weights(DeepEncoderModel.from_pretrained(REPO, subfolder="sub", cache_dir=str(cache)), model)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    forced = RecordingRemote(repository)
    third, _ = load_tower(
        REPO, hub=HubOptions(subfolder="sub", cache_dir=str(cache), force_download=True), remote=forced
    )
    assert_same_weights(third, model)
    assert forced.filesystem.bytes_read == remote.filesystem.bytes_read


def model_language_bytes(folder: Path) -> int:
    """Bytes of the language-model tensors in the shards (what a vision-only read must skip)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            total += sum(
                handle.get_tensor(key).numel() * handle.get_tensor(key).element_size()
                for key in handle.keys()
                if not key.startswith(("model.sam_model", "model.vision_model", "model.projector", "model.image_"))
                and key != "model.view_seperator"
            )
    return total


def test_deepseek_ocr2_from_the_hub_cache(tmp_path, monkeypatch, no_hub):
    """`from_deepseek_ocr2` and `from_pretrained` of the V2 tower take the same hub arguments (a DeepSeek-OCR-2
    checkpoint in the cache layout, tag `v1`, subfolder `ocr2`, offline)."""
    from safetensors.torch import save_file

    config = DeepEncoderV2Config(**tiny_config_kwargs())
    reference = DeepEncoderV2Model(config).eval()
    shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    state = seeded_state_dict(shapes, seed=9)
    reference.load_state_dict(state)
    repository = tmp_path / "repo"
    (repository / "ocr2").mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in to_deepseek_ocr2(state).items()}
    tensors["model.embed_tokens.weight"] = torch.randn(100, 16)
    save_file(tensors, str(repository / "ocr2" / "model.safetensors"), metadata={"format": "pt"})
    (repository / "ocr2" / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_v2"}))
    cache = tmp_path / "cache"
    hub_cache_layout(repository, cache, "org/DeepSeek-OCR-2", COMMIT, refs=("v1",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    heads = {k: v for k, v in tiny_config_kwargs().items() if k != "projector_dim"}
    hub = dict(revision="v1", subfolder="ocr2", cache_dir=str(cache), local_files_only=True)
    for loaded in (
        DeepEncoderV2Model.from_deepseek_ocr2("org/DeepSeek-OCR-2", **hub, **heads),
        DeepEncoderV2Model.from_pretrained("org/DeepSeek-OCR-2", **hub, **heads),
    ):
        assert type(loaded) is DeepEncoderV2Model
        for key, value in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_local_folder_subfolder(tmp_path):
    """`subfolder` applies to a local folder too, as in `from_pretrained`."""
    model = random_model(seed=10)
    root = deepseek_repository(model, tmp_path / "local")
    assert_same_weights(DeepEncoderModel.from_pretrained(str(root), subfolder="sub"), model)
    shutil.rmtree(root / "sub")
    with pytest.raises(CheckpointError):
        DeepEncoderModel.from_deepseek_ocr(str(root), subfolder="sub")


def test_range_file_reads_ahead_and_serves_from_the_cache(tmp_path, monkeypatch):
    """A remote file larger than the read-ahead, read at scattered offsets: every read returns the file's bytes; a
    miss fetches at least `READ_AHEAD` bytes (so neighbouring small reads cost no request); a re-read of the same
    spans in a new file system (another load) fetches nothing; offline, a span never read is an error naming it."""
    repository = tmp_path / "repo"
    repository.mkdir()
    data = torch.randint(0, 256, (3 * hub_module.READ_AHEAD + 123,), generator=torch.Generator().manual_seed(0))
    payload = bytes(data.to(torch.uint8).tolist())
    (repository / "blob.bin").write_bytes(payload)
    spans = [
        (0, 8),
        (8, 100),
        (hub_module.READ_AHEAD + 5, hub_module.READ_AHEAD + 50),
        (len(payload) - 10, len(payload)),
    ]
    options = HubOptions(cache_dir=str(tmp_path / "cache"))

    def read_all(filesystem):
        with filesystem.open("blob.bin") as handle:
            out = []
            for start, end in spans:
                handle.seek(start)
                out.append(handle.read(end - start))
            return out

    remote = RecordingRemote(repository)
    assert read_all(hub_module.HubCacheFileSystem(REPO, options, remote)) == [payload[a:b] for a, b in spans]
    assert len(remote.filesystem.reads) == 3  # (0, 8) fetched 0..READ_AHEAD, which (8, 100) then hits
    assert all(
        length >= min(hub_module.READ_AHEAD, len(payload) - offset) for _, offset, length in remote.filesystem.reads
    )
    again = RecordingRemote(repository)
    assert read_all(hub_module.HubCacheFileSystem(REPO, options, again)) == [payload[a:b] for a, b in spans]
    assert again.filesystem.reads == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hub_module.HubCacheFileSystem(REPO, options, RecordingRemote(repository))
    with offline.open("blob.bin") as handle:
        handle.seek(2 * hub_module.READ_AHEAD + 7)
        with pytest.raises(CheckpointError, match="not in the hub cache"):
            handle.read(10)


def test_hub_remote_requests(monkeypatch):
    """What `HubRemote` asks the hub (no network here: the two calls are recorded): a revision resolved by one
    `model_info(files_metadata=True)` whose siblings give sizes and blob ids (LFS sha256, else the git blob id);
    a range as one GET of the file at the commit with `range: bytes=start-(end-1)` and the token's header."""
    import huggingface_hub
    import huggingface_hub.utils
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    calls = []

    class Api:
        def __init__(self, token=None):
            calls.append(("token", token))

        def model_info(self, repo_id, revision=None, files_metadata=False):
            calls.append(("model_info", repo_id, revision, files_metadata))
            lfs = BlobLfsInfo(size=10, sha256="f" * 64, pointer_size=100)
            siblings = [
                RepoSibling("sub/model.safetensors", size=10, blob_id="a" * 40, lfs=lfs),
                RepoSibling("sub/config.json", size=5, blob_id="b" * 40),
            ]
            return type("Info", (), {"sha": COMMIT, "siblings": siblings})()

    class Response:
        content = b"0123"
        status_code = 206

    def backoff(method, url, headers=None, timeout=None):
        calls.append((method, url, headers["range"], headers.get("authorization")))
        return Response()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub.utils, "http_backoff", backoff)
    monkeypatch.setattr(huggingface_hub.utils, "hf_raise_for_status", lambda response: None)
    remote = hub_module.HubRemote(token="hf_secret")
    commit, files = remote.snapshot(REPO, "v1.0")
    assert commit == COMMIT
    assert files == {
        "sub/model.safetensors": RemoteFile(10, "f" * 64),
        "sub/config.json": RemoteFile(5, "b" * 40),
    }
    assert remote.read_range(REPO, COMMIT, "sub/model.safetensors", 6, 10) == b"0123"
    endpoint = huggingface_hub.constants.ENDPOINT
    assert calls == [
        ("token", "hf_secret"),
        ("model_info", REPO, "v1.0", True),
        (
            "GET",
            f"{endpoint}/{REPO}/resolve/{COMMIT}/sub/model.safetensors",
            "bytes=6-9",
            "Bearer hf_secret",
        ),
    ]
