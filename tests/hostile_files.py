"""Hostile files, small and built at test time: builders for each class of file a user may be handed
(dataset zips, ``.npz`` archives and ``.npy`` arrays, images, YAML configs, the settings a network file
records) and of trap in a folder a command reads or writes (FIFOs, planted symlinks). Each builder writes
into a folder and returns the path it made; tests/unit/test_security.py runs the commands on them. (The
hostile checkpoint pickles are assembled opcode by opcode in that test file itself.)

``python -m tests.hostile_files OUT`` writes every one of them into the folder OUT, to try them by hand.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

# --- .npy / .npz -------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, header_shape: tuple | None = None, version: tuple[int, int] = (1, 0)) -> bytes:
    """``array`` as .npy bytes, with a header that claims ``header_shape`` instead of its own shape."""
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
              "shape": tuple(array.shape if header_shape is None else header_shape)}
    buffer = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(buffer, header)
    if version not in ((1, 0), (2, 0)):
        data = bytearray(buffer.getvalue())
        data[6:8] = bytes(version)
        buffer = io.BytesIO(bytes(data))
        buffer.seek(0, io.SEEK_END)
    buffer.write(np.ascontiguousarray(array).tobytes())
    return buffer.getvalue()


def _npz(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return path


def npz_shape_lie(folder: Path) -> Path:
    """Samples whose header declares 10^12 images of 32 x 32 x 3 in a 3 KB member."""
    images = np.zeros((1, 32, 32, 3), np.uint8)
    return _npz(folder / "shape-lie.npz", {"arr_0": npy_bytes(images, (10**12, 32, 32, 3))})


def npz_bomb(folder: Path) -> Path:
    """A deflated member of 64 MiB of zeros (about 64 KB in the file): honest, but larger than a bound the
    test sets; a real bomb is the same file at a size beyond memory."""
    zeros = np.zeros((64, 1024, 1024), np.uint8)
    return _npz(folder / "bomb.npz", {"arr_0": npy_bytes(zeros)}, zipfile.ZIP_DEFLATED)


def npz_objects(folder: Path) -> Path:
    """Statistics whose mu is an array of Python objects (reading it would unpickle)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([None, 1], dtype=object), allow_pickle=True)
    return _npz(folder / "objects.npz", {"mu": buffer.getvalue(), "sigma": npy_bytes(np.eye(2))})


def npz_version_3(folder: Path) -> Path:
    """A format-3.0 header (structured dtypes with UTF-8 field names), which no data array needs."""
    return _npz(folder / "version3.npz", {"arr_0": npy_bytes(np.zeros((2, 4, 4, 3), np.uint8), version=(3, 0))})


def npz_sigma_mismatch(folder: Path) -> Path:
    """Statistics with a 4-d mu and a sigma declared 100000 x 100000 (80 GB) in a small member."""
    return _npz(folder / "sigma.npz", {"mu": npy_bytes(np.zeros(4)), "sigma": npy_bytes(np.eye(2), (10**5, 10**5))})


def npz_bzip2(folder: Path) -> Path:
    """A bzip2-compressed member (bzip2 inflates far beyond deflate's ratio)."""
    return _npz(folder / "bzip2.npz", {"arr_0": npy_bytes(np.zeros((2, 4, 4, 3), np.uint8))}, zipfile.ZIP_BZIP2)


def npz_labels_mismatch(folder: Path) -> Path:
    """A dataset .npz with 4 images and 10^9 labels declared."""
    return _npz(folder / "labels.npz", {"arr_0": npy_bytes(np.zeros((4, 8, 8, 3), np.uint8)),
                                        "arr_1": npy_bytes(np.zeros(4, np.int64), (10**9,))})


def npy_latent_lie(folder: Path) -> Path:
    """A folder of latents whose second array's header claims 4 x 10^6 x 10^6 float32 values."""
    root = folder / "latents"
    root.mkdir()
    (root / "a.npy").write_bytes(npy_bytes(np.zeros((4, 8, 8), np.float32)))
    (root / "b.npy").write_bytes(npy_bytes(np.zeros((4, 8, 8), np.float32), (4, 10**6, 10**6)))
    return root


NPZ_BUILDERS = (npz_shape_lie, npz_bomb, npz_objects, npz_version_3, npz_sigma_mismatch, npz_bzip2,
                npz_labels_mismatch, npy_latent_lie)

# --- images -------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (the header is all a bound needs to refuse it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def huge_png(folder: Path) -> Path:
    """A folder with one 70-byte PNG that claims 13000 x 13000 pixels."""
    (folder / "huge").mkdir()
    (folder / "huge" / "a.png").write_bytes(png_claiming(13000, 13000))
    return folder / "huge"


def postscript_png(folder: Path) -> Path:
    """A folder with a PostScript file named a.png (Pillow's EPS plugin would start Ghostscript)."""
    (folder / "eps").mkdir()
    (folder / "eps" / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    return folder / "eps"


def oversized_pngs(folder: Path) -> Path:
    """A folder of two 1100 x 1100 PNGs (a few KB each): within Pillow's pixel bound, 64 of them a batch of
    232 million values."""
    from PIL import Image

    (folder / "oversized").mkdir()
    for name, colour in (("a.png", (0, 0, 0)), ("b.png", (9, 99, 199))):
        Image.new("RGB", (1100, 1100), colour).save(folder / "oversized" / name)
    return folder / "oversized"


IMAGE_BUILDERS = (huge_png, postscript_png, oversized_pngs)


# --- dataset zips ---------------------------------------------------------------------------------------


def _png(size: int = 8) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_dataset(folder: Path, name: str = "plain.zip", method: int = zipfile.ZIP_STORED,
                members: dict | None = None) -> Path:
    """A zip of ``members`` (default: one 8 x 8 PNG, ``a.png``) compressed by ``method``."""
    path = folder / name
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for member, data in (members or {"a.png": _png()}).items():
            z.writestr(member, data)
    return path


def zip_corrupt_directory(folder: Path) -> Path:
    """A zip whose central directory's offset points into its first member."""
    path = zip_dataset(folder, "corrupt.zip")
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 16:end + 20] = struct.pack("<I", 7)
    path.write_bytes(bytes(data))
    return path


def zip_bzip2(folder: Path) -> Path:
    """A zip whose member is compressed with bzip2 (which inflates far beyond deflate's ratio)."""
    return zip_dataset(folder, "bzip2.zip", zipfile.ZIP_BZIP2)


def zip_bad_crc(folder: Path) -> Path:
    """A zip whose member's bytes fail their CRC."""
    path = zip_dataset(folder, "crc.zip")
    data = bytearray(path.read_bytes())
    data[data.index(_png()[:16]) + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def zip_huge_label(folder: Path) -> Path:
    """A zip whose dataset.json gives its image the class id 10^12 (an embedding of that many rows)."""
    return zip_dataset(folder, "labels.zip", members={"a.png": _png(),
                                                      "dataset.json": '{"labels": [["a.png", 1000000000000]]}'})


ZIP_BUILDERS = (zip_corrupt_directory, zip_bzip2, zip_bad_crc, zip_huge_label)

# --- YAML configs -------------------------------------------------------------------------------------


def yaml_alias_bomb(folder: Path) -> Path:
    """9 levels of 9 aliases: 387 million values once expanded, 400 bytes in the file."""
    letters = "abcdefghij"
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip(letters, letters[1:]))
    (folder / "bomb.yaml").write_text(text)
    return folder / "bomb.yaml"


def yaml_deep(folder: Path) -> Path:
    """Lists nested 450 deep."""
    (folder / "deep.yaml").write_text("x: " + "[" * 450 + "]" * 450 + "\n")
    return folder / "deep.yaml"


def yaml_long_integer(folder: Path) -> Path:
    """A seed of 5,001 digits."""
    (folder / "digits.yaml").write_text("training:\n  seed: 1" + "0" * 5000 + "\n")
    return folder / "digits.yaml"


def yaml_base_credentials(folder: Path) -> Path:
    """cfgs/steal.yaml whose ``base:`` is a credentials file next to its folder."""
    (folder / "credentials").write_text("[default]\naws_secret_access_key = SECRETVALUE123\n")
    (folder / "cfgs").mkdir(exist_ok=True)
    (folder / "cfgs" / "steal.yaml").write_text("base: ../credentials\n")
    return folder / "cfgs" / "steal.yaml"


def yaml_escapes(folder: Path) -> Path:
    """A config key holding a terminal escape (clear screen) and a newline."""
    (folder / "escapes.yaml").write_text('base: toy2d\neval:\n  "seed\\e[2J\\nfake: line": 1\n')
    return folder / "escapes.yaml"


YAML_BUILDERS = (yaml_alias_bomb, yaml_deep, yaml_long_integer, yaml_base_credentials, yaml_escapes)

# --- the settings a network file records --------------------------------------------------------------


def network_recording(folder: Path, settings: dict, name: str = "net.safetensors", img_channels: int = 2) -> Path:
    """A tiny MLP network file that records ``settings`` (what imm generate / imm eval fid read without
    --config)."""
    import imm
    from imm.io.checkpoint import save_network

    net = imm.IMMNetwork(img_resolution=1, img_channels=img_channels, model_type="MLP", hidden=16, depth=1)
    save_network(net, folder / name, settings)
    return folder / name


def network_escaping_entry(folder: Path) -> Path:
    """A sampling entry named ../../escaped: its files would be written two folders above --out."""
    return network_recording(folder, {"encoder": {"kind": "identity"}, "sampling": {"../../escaped": {"num_steps": 1}}},
                             "escaping-entry.safetensors")


def network_planted_vae(folder: Path) -> Path:
    """A latent network whose encoder.vae_name is a folder of the attacker's choosing."""
    return network_recording(folder, {"encoder": {"kind": "sd_vae", "vae_name": str(folder / "planted-vae")},
                                      "sampling": {"1_step": {"num_steps": 1}}}, "planted-vae.safetensors", 4)


SETTINGS_BUILDERS = (network_escaping_entry, network_planted_vae)

# --- traps in folders ---------------------------------------------------------------------------------


def dataset_with_fifo(folder: Path) -> Path:
    """A folder of three 8 x 8 PNGs and a FIFO named 1b.png (opening it for reading waits for a writer)."""
    from PIL import Image

    root = folder / "with-fifo"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(root / f"{i}.png")
    os.mkfifo(root / "1b.png")
    return root


def planted_links(folder: Path, names: list[str]) -> Path:
    """``victim.txt`` holding "keep me", and a symlink to it at each of ``names`` (relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / "victim.txt"
    victim.write_text("keep me\n")
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(victim)
    return victim


def planted_folder_link(folder: Path, name: str) -> Path:
    """A folder ``victim`` (with a file and a temporary file the trainer would delete), and a symlink to it
    at ``folder/name``."""
    victim = folder / "victim"
    victim.mkdir(parents=True, exist_ok=True)
    (victim / "000000.png").write_bytes(b"keep me")
    (victim / ".kept.tmp").write_bytes(b"keep me too")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(victim, target_is_directory=True)
    return victim


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for build in NPZ_BUILDERS + IMAGE_BUILDERS + ZIP_BUILDERS + YAML_BUILDERS + SETTINGS_BUILDERS:
        print(build(out))
    print(dataset_with_fifo(out))
    print(planted_links(out / "generate-out", ["1_step_samples.png", "fid.json"]))
    print(planted_folder_link(out / "run", "checkpoints"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
