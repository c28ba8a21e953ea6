"""Resumable outputs check what they resume: `imm generate --num-images` records
its settings and verifies its PNGs, `imm prepare images` never opens FIFOs, scales 16-bit images and
names what it skips, `imm eval fid --samples` names unreadable files, and outputs get the user's mode."""

import json
import os
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import imm
from imm.cli import main
from imm.data.prepare import prepare_images
from imm.evaluation.evaluate import load_images
from tests.helpers import FIXTURES, GENERATE

UNET = FIXTURES / "unet_cifar_like.pkl"


def finishes(fn, fifo, timeout=60):
    """``fn()``'s result, run in a thread; if it is still blocked on ``fifo`` after ``timeout`` s, open
    the FIFO's writing end to release it and fail (instead of hanging the suite)."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the test below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    blocked = thread.is_alive()
    if blocked:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
    assert not blocked, f"blocked on the FIFO {fifo}"
    if "error" in result:
        raise result["error"]
    return result["value"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


# --------------------------------------------------------------------------------------------------
# imm generate --num-images


def test_generate_refuses_other_settings_in_the_same_out(generated, tmp_path, capsys):
    out, images = generated
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    net = imm.load_network(UNET)
    with torch.no_grad():
        next(iter(net.parameters())).add_(0.5)
    imm.save_network(net, other)
    same = tmp_path / "same.safetensors"
    imm.convert(UNET, same)
    for extra, differs in [(["--seed", "1"], "seed: 0 there, 1 now"),
                           (["sampling.2_steps.mid_nt=[1.2]"], "sampling.mid_nt: [1.4] there, [1.2] now"),
                           (["network.temb_type=stride"], "network.temb_type: 'identity' there, 'stride' now"),
                           (["--checkpoint", str(other)], "weights_sha256"),
                           (["--precision", "bf16"], "precision: None there, 'bf16' now")]:
        assert main(GENERATE + ["--out", str(out)] + extra) == 2, extra
        err = error_line(capsys)
        assert str(out / "2_steps") in err and differs in err and "another --out" in err, err
        assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)
    # the same weights in another file format are the same settings
    assert main(GENERATE + ["--out", str(out), "--checkpoint", str(same)]) == 0
    assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)
    # PNGs of unknown origin (no settings file) are not adopted
    (out / "2_steps.settings.json").unlink()
    assert main(GENERATE + ["--out", str(out)]) == 2
    assert "2_steps.settings.json" in error_line(capsys)


def test_generate_in_bf16_samples_what_fp32_samples_to_bf16_resolution(generated, tmp_path, capsys):
    """``--precision bf16`` samples with the network's bf16 working copy; the suite's probe cache makes auto fp32,
    so the fixture's images are fp32 ones."""
    _, fp32 = generated
    capsys.readouterr()
    assert main(GENERATE + ["--out", str(tmp_path / "bf16"), "--precision", "bf16",
                            "--memory-format", "channels_last"]) == 0
    bf16 = np.load(tmp_path / "bf16" / "2_steps.npz")["arr_0"]
    diff = np.abs(bf16.astype(int) - fp32.astype(int))
    assert diff.any() and diff.mean() < 2 and diff.max() <= 16, (diff.mean(), diff.max())
    assert json.loads((tmp_path / "bf16" / "2_steps.settings.json").read_text())["precision"] == "bf16"


def test_generate_redraws_damaged_pngs(generated):
    out, images = generated
    folder = out / "2_steps"
    data = (folder / "000001.png").read_bytes()
    (folder / "000001.png").write_bytes(data[: len(data) // 2])  # a kill during a copy
    (folder / "000002.png").write_bytes(b"")
    (folder / "000003.png").unlink()
    os.mkfifo(folder / "000003.png")  # never opened
    kept = (folder / "000000.png").stat().st_mtime_ns
    assert finishes(lambda: main(GENERATE + ["--out", str(out)]), folder / "000003.png") == 0
    assert (folder / "000000.png").stat().st_mtime_ns == kept
    assert (folder / "000003.png").is_file()
    assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)


def test_generate_npz_is_replaced_atomically(generated, monkeypatch, capsys):
    out, images = generated
    real_savez = np.savez

    def savez_then_fail(file, **arrays):  # the disk fills up half way
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                f.write(b"PK\x03\x04 partial")
        else:
            file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")  # ENOSPC, what a full disk raises

    monkeypatch.setattr(np, "savez", savez_then_fail)
    assert main(GENERATE + ["--out", str(out)]) == 2
    monkeypatch.setattr(np, "savez", real_savez)
    assert np.array_equal(np.load(out / "2_steps.npz")["arr_0"], images)
    assert sorted(p.name for p in out.iterdir()) == ["2_steps", "2_steps.npz", "2_steps.settings.json"]


def test_generate_outputs_have_the_users_mode(tmp_path, umask_022):
    out = tmp_path / "out"
    assert main(GENERATE + ["--out", str(out)]) == 0
    for path in (out / "2_steps.npz", out / "2_steps.settings.json", out / "2_steps" / "000000.png"):
        assert mode(path) == umask_022, path


# --------------------------------------------------------------------------------------------------
# imm prepare images


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (color type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA) of HxW[xC] samples: PNG spec
    (W3C, 2nd edition) sections 5 (chunks), 11.2.2 (IHDR) and 9 (filter type 0)."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def to_8bit(v):
    return np.floor(np.asarray(v) * 255 / 65535 + 0.5).astype(np.uint8)


def read_items(dest) -> list[np.ndarray]:
    with zipfile.ZipFile(dest) as zf:
        return [np.asarray(Image.open(zf.open(n))) for n in sorted(zf.namelist()) if n.endswith(".png")]


def test_prepare_skips_fifos_unopened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(src / "a.png")
    os.mkfifo(src / "pipe.png")
    info = finishes(lambda: prepare_images(src, tmp_path / "out.zip", 8, progress=False), src / "pipe.png")
    assert info["count"] == 1 and info["skipped"] == {"not a regular file": ["pipe.png"]}


def test_prepare_scales_16_bit_images_with_rounding(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 65536, (8, 8))
    gray[0, :4] = [511, 383, 65535, 0]  # 511 / 257 = 1.99: rounds to 2 (the high byte says 1)
    rgb = rng.integers(0, 65536, (8, 8, 3))
    rgb[0, 0] = [511, 32767, 33023]
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(gray.astype(np.uint16)).save(src / "a_gray_pil.png")  # Pillow's I;16
    (src / "b_gray.png").write_bytes(png16(gray, 0))
    (src / "c_rgb.png").write_bytes(png16(rgb, 2))
    (src / "d_gray_alpha.png").write_bytes(png16(rng.integers(0, 65536, (8, 8, 2)), 4))
    info = prepare_images(src, tmp_path / "out.zip", 8, progress=False)
    assert info["count"] == 3 and info["skipped"] == {"unsupported bit depth": ["d_gray_alpha.png"]}
    a, b, c = read_items(tmp_path / "out.zip")
    expected_gray = np.repeat(to_8bit(gray)[..., None], 3, axis=2)
    assert np.array_equal(a, expected_gray) and np.array_equal(b, expected_gray)
    assert np.array_equal(c, to_8bit(rgb))


def test_prepare_names_the_files_it_skips(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "good.png")
    Image.new("RGB", (2, 2)).save(src / "tiny.png")
    for i in range(7):
        (src / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["prepare", "images", "--source", str(src), "--dest", str(tmp_path / "o.zip"), "--resolution", "16",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert ("skipped 8: 7 unreadable, 1 too small (unreadable: bad0.jpg, bad1.jpg, bad2.jpg, bad3.jpg, bad4.jpg, "
            "...; too small: tiny.png)") in out


def test_prepare_archive_has_the_users_mode(tmp_path, umask_022):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.png")
    prepare_images(src, tmp_path / "out.zip", 8, progress=False)
    assert mode(tmp_path / "out.zip") == umask_022


# --------------------------------------------------------------------------------------------------
# imm eval fid --samples


def sample_folder(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(folder / f"{i:06d}.png")
    return folder


def test_eval_samples_name_a_truncated_png(tmp_path, capsys):
    folder = sample_folder(tmp_path)
    data = (folder / "000001.png").read_bytes()
    (folder / "000001.png").write_bytes(data[: len(data) - 30])
    assert main(["eval", "fid", "--samples", str(folder), "--ref", "mnist", "--device", "cpu", "--no-progress"]) == 2
    assert str(folder / "000001.png") in error_line(capsys)


def test_eval_samples_refuse_fifos(tmp_path):
    folder = sample_folder(tmp_path)
    os.mkfifo(folder / "000003.png")
    with pytest.raises(ValueError, match="000003.png: not a regular file"):
        finishes(lambda: load_images(folder), folder / "000003.png")
    os.mkfifo(tmp_path / "samples.npz")
    with pytest.raises(ValueError, match="samples.npz.*not a regular file"):
        finishes(lambda: load_images(tmp_path / "samples.npz"), tmp_path / "samples.npz")


def test_training_and_prepare_refuse_a_fifo_unopened(tmp_path):
    """A FIFO among a folder's images: `imm prepare images` names and skips it, training reports it as an
    unreadable sample (which the loader skips); neither opens it."""
    from imm.data.datasets import ImageFolderDataset, UnreadableSample
    from imm.data.loader import make_loader
    from tests.hostile_files import dataset_with_fifo

    src = dataset_with_fifo(tmp_path)
    fifo = src / "1b.png"
    info = finishes(lambda: prepare_images(src, tmp_path / "out.zip", 8, progress=False), fifo)
    assert info["count"] == 3 and info["skipped"] == {"not a regular file": ["1b.png"]}
    dataset = finishes(lambda: ImageFolderDataset(src), fifo)
    assert len(dataset) == 4 and dataset._files[2] == "1b.png"
    with pytest.raises(UnreadableSample, match="1b.png: not a regular file"):
        finishes(lambda: dataset[2], fifo)
    loader = make_loader(dataset, 4, shuffle=False, max_unreadable=1)
    raw, _ = finishes(lambda: next(loader), fifo)
    assert list(loader.unreadable) == [2] and torch.equal(raw[2], dataset[3][0])
