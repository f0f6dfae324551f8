"""Shared pieces of the `encode` pipeline tests: generated documents, the bad-input zoo, a tiny saved model, and
a direct model call that reproduces the pipeline's batches."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from helpers import random_model
from PIL import Image, ImageDraw

from deepencoder import DeepEncoderImageProcessor
from deepencoder.pipeline import RenderOptions, default_long_side
from deepencoder.pipeline.sources import Document, PageReader

REPO = Path(__file__).resolve().parents[1]
# small views so the tiny tower runs in milliseconds; tiles still appear (pages above 128 px)
PROCESSOR_KW = dict(mode="gundam", base_size=256, tile_size=128)
CLI_SIZE = ["--mode", "gundam", "--base-size", "256", "--tile-size", "128", "--no-progress"]


def processor() -> DeepEncoderImageProcessor:
    return DeepEncoderImageProcessor(**PROCESSOR_KW)


def text_page(size: tuple[int, int], label: str, color: str = "white") -> Image.Image:
    page = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(page)
    for line in range(0, size[1] - 20, 24):
        draw.text((10, 10 + line), f"{label} line {line // 24}", fill="black")
    return page


def make_pdf(path: Path, pages: int, size=(300, 400), label="pdf") -> Path:
    images = [text_page(size, f"{label} p{i}") for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72.0)
    return path


def make_documents(folder: Path) -> list[Path]:
    """A 3-page PDF (tiled pages), a 2-page PDF, a small PNG (untiled), a JPEG (tiled)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        make_pdf(folder / "book.pdf", 3),
        make_pdf(folder / "memo.pdf", 2, size=(400, 250), label="memo"),
        _save(text_page((100, 80), "png"), folder / "small.png"),
        _save(text_page((300, 200), "jpg"), folder / "photo.jpg"),
    ]


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def build_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF with a correct xref from raw object bodies (object 1 is the catalog)."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + trailer_extra + b">>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted_pdf() -> bytes:
    """Standard security handler, revision 2, with a user password that is not empty."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"ab" * 32 + b"> /U <" + b"cd" * 32 + b"> /P -44 >>",
    ]
    return build_pdf(objects, b"/Encrypt 4 0 R /ID [<" + b"01" * 16 + b"><" + b"01" * 16 + b">] ")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb as Pillow sees it) with a tiny body."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def make_zoo(folder: Path) -> tuple[list[str], dict[str, int]]:
    """Bad inputs and convertible oddities. Returns (inputs to pass, good pages expected per source name); every
    other input must give exactly one error row."""
    folder.mkdir(parents=True, exist_ok=True)
    good_png = io.BytesIO()
    text_page((200, 160), "good").save(good_png, format="PNG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (folder / "encrypted.pdf").write_bytes(encrypted_pdf())
    (folder / "malformed.pdf").write_bytes(b"%PDF-1.4\nthis is not a PDF body\n")
    (folder / "bomb.png").write_bytes(png_claiming(20000, 20000))
    Image.new("L", (1, 20000), 200).save(folder / "strip.png")
    # convertible: CMYK, 16-bit grayscale, palette with transparency, RGBA, multi-page TIFF, WebP, BMP
    text_page((180, 140), "cmyk").convert("CMYK").save(folder / "cmyk.jpg")
    gray16 = (np.linspace(0, 65535, 150 * 120).reshape(120, 150)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    palette = text_page((160, 120), "palette").convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    rgba = text_page((150, 150), "alpha").convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    frames = [text_page((220, 160), f"tiff p{i}") for i in range(3)]
    frames[0].save(folder / "scan.tif", save_all=True, append_images=frames[1:])
    text_page((140, 100), "webp").save(folder / "pic.webp")
    text_page((120, 90), "bmp").save(folder / "pic.bmp")
    make_pdf(folder / "good.pdf", 2)
    inputs = [str(folder), str(folder / "missing.png")]
    good = {"cmyk.jpg": 1, "gray16.png": 1, "palette.png": 1, "alpha.png": 1, "scan.tif": 3, "pic.webp": 1,
            "pic.bmp": 1, "good.pdf": 2}  # fmt: skip
    return inputs, good


ZOO_ERRORS = {"zero.png", "truncated.png", "garbage.jpg", "encrypted.pdf", "malformed.pdf", "bomb.png", "strip.png",
              "missing.png"}  # fmt: skip


def tiny_weights(folder: Path, seed: int = 0) -> Path:
    model = random_model(seed=seed)
    model.save_pretrained(folder)
    return folder


def direct_outputs(rows: list[dict], model, batch_size: int, features: str = "projected") -> dict[tuple, torch.Tensor]:
    """Re-run the tower directly on the pipeline's batches: consecutive ok rows of one run, `batch_size` at a time,
    rendered by the same page reader. Returns {(document, page): tensor}."""
    proc = processor()
    reader = PageReader(RenderOptions(target_long_side=default_long_side(proc.resolution)))
    out = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [
            reader.read(Document(row["source"], row["document"], "pdf" if row["source"].endswith(".pdf") else "image"),
                        row["page"])
            for row in chunk
        ]  # fmt: skip
        with torch.inference_mode():
            result = model(**proc(images), output_pre_projector=features == "pre-projector")
        tensors = result.pre_projector if features == "pre-projector" else result.image_embeds
        for row, tensor in zip(chunk, tensors):
            out[(row["document"], row["page"])] = tensor
    reader.close()
    return out


def cli(args: list[str], cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "deepencoder", "encode", *args], cwd=cwd, env=env, capture_output=True, text=True,
        **kwargs,
    )  # fmt: skip


def gated_cli(gate: Path, args: list[str], **kwargs) -> subprocess.Popen:
    """`deepencoder encode args` started in the background, stopping after each batch at a gate (`gated_encode.py`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).resolve().parent / "gated_encode.py"
    return subprocess.Popen([sys.executable, str(script), str(gate), *args], env=env, **kwargs)


def wait_for(condition, process: subprocess.Popen | None = None, what: str = "") -> None:
    """Wait until `condition()` holds. Fails only if `process` exits first, or after 20 minutes (a hang, not a slow
    machine): no verdict depends on how fast a step runs."""
    give_up = time.monotonic() + 1200
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before {what or 'the awaited step'}")
        if time.monotonic() > give_up:
            raise AssertionError(f"still waiting for {what or 'the awaited step'} after 20 minutes")
        time.sleep(0.02)


def processes_with(text: str) -> list[int]:
    """Pids of this machine's processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class CrashOnce(torch.nn.Module):
    """A tower whose first forward (in any process) kills its process, as a segfaulting page or an OOM-killed
    worker would: `marker` is created first, so the retried batch runs normally."""

    def __init__(self, model: torch.nn.Module, marker: str) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.marker = marker

    def forward(self, **kwargs):
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return self.model(**kwargs)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)


class CrashOnceLoader:
    """Picklable model loader for the Ray engine: the saved tiny tower wrapped in `CrashOnce`."""

    def __init__(self, weights: Path, marker: Path) -> None:
        self.weights, self.marker = str(weights), str(marker)

    def __call__(self) -> torch.nn.Module:
        from deepencoder import DeepEncoderModel

        return CrashOnce(DeepEncoderModel.from_pretrained(self.weights).eval(), self.marker)


def copy_tree_to(fs_url: str, folder: Path) -> None:
    """Copy a local folder's files to an fsspec URL (e.g. memory://in)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(fs_url)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def comparable(rows: list[dict], volatile=("seconds",)) -> dict[tuple, dict]:
    """Manifest rows keyed by (source file name, page), timing fields dropped."""
    return {(Path(r["source"]).name, r["page"]): {k: v for k, v in r.items() if k not in volatile} for r in rows}
