"""`imm prepare`: image archives, VAE latent archives (resume), stats, class labels (with 2
processes and training on the latents: tests/integration/test_prepare.py)."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from imm.cli import main
from imm.data.datasets import ImageFolderDataset
from imm.data.latents import stats_path_for, write_latent_archive
from imm.data.prepare import (
    Source,
    apply_transform,
    center_crop,
    center_crop_dhariwal,
    center_crop_wide,
    dataset_stats,
    prepare_images,
)
from tests.helpers import CLASSES

# --------------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (1000, 90)])
def test_transforms_give_rgb_squares(size):
    img = Image.new("L", size, 128)
    for fn in (center_crop, center_crop_dhariwal, center_crop_wide):
        out = fn(img.convert("RGB"), 32)
        assert out.size == (32, 32) and out.mode == "RGB"
    out = apply_transform(Image.new("RGBA", size, (255, 0, 0, 255)), "center-crop-wide", 32)
    arr = np.asarray(out)
    assert (arr[:8] == 0).all() and (arr[24:] == 0).all()  # black bands above and below the 2:1 strip
    assert (arr[8:24, :, 0] == 255).all()


def test_no_transform_needs_the_target_size():
    assert apply_transform(Image.new("P", (16, 16)), None, 16).mode == "RGB"
    with pytest.raises(ValueError, match="not 16x16.*--transform"):
        apply_transform(Image.new("RGB", (20, 16)), None, 16)


def test_dhariwal_crop_on_a_known_image():
    # 600x400 blue with a centred red 200x200 square. ADM's recipe at 64: BOX-halve while the short
    # side is >= 128 (600x400 -> 300x200 -> 150x100), BICUBIC to short side 64 (96x64), centre crop
    # 64x64 (x from 16): the square lands on x, y in [16, 48).
    img = Image.new("RGB", (600, 400), (0, 0, 255))
    img.paste((255, 0, 0), (200, 100, 400, 300))
    arr = np.asarray(center_crop_dhariwal(img, 64)).astype(int)
    assert arr.shape == (64, 64, 3)
    red = (arr[..., 0] > 128) & (arr[..., 2] < 128)
    assert red[18:46, 18:46].all() and not red[:14].any() and not red[50:].any()
    assert not red[:, :14].any() and not red[:, 50:].any()
    # 256 px noise at 64: two BOX halvings (the bicubic step is then a no-op), not one bicubic resize
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    halved = noise.resize((128, 128), Image.BOX).resize((64, 64), Image.BOX)
    out = center_crop_dhariwal(noise, 64)
    assert np.array_equal(np.asarray(out), np.asarray(halved))
    assert not np.array_equal(np.asarray(out), np.asarray(noise.resize((64, 64), Image.BICUBIC)))


# --------------------------------------------------------------------------------------------------
# imm prepare images


def test_images_archive_labels_and_layout(photo_dir, image_zip):
    ds = ImageFolderDataset(image_zip)
    n = sum(1 for _ in photo_dir.rglob("*.*"))
    assert len(ds) == n and ds.resolution == 16 and ds.num_channels == 3  # grayscale/RGBA became RGB
    with zipfile.ZipFile(image_zip) as zf:
        meta = json.loads(zf.read("dataset.json"))
        names = sorted(x for x in zf.namelist() if x.endswith(".png"))
    assert names[0] == "00000/img00000000.png" and names[-1] == f"00000/img{n - 1:08d}.png"
    assert meta["class_names"] == list(CLASSES)
    # sorted class folders -> 0..K-1, items in sorted path order
    expected = [CLASSES.index(p.parent.name) for p in sorted(photo_dir.rglob("*.*"),
                                                              key=lambda p: p.relative_to(photo_dir).as_posix())]
    assert [lab for _, lab in meta["labels"]] == expected
    assert ds.label_histogram() == [expected.count(i) for i in range(3)]


def test_label_mapping_rules(tmp_path):
    def make(root, names):
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / name)
        return root

    src = make(tmp_path / "a", ["zebra/1.png", "ant/2.png", "ant/sub/3.png", "moth/4.png"])
    s = Source(src)
    assert s.class_names == ["ant", "moth", "zebra"] and s.labels == [0, 0, 1, 2]
    assert Source(src, use_labels=False).labels is None
    assert Source(make(tmp_path / "b", ["1.png", "x/2.png", "y/3.png"])).labels is None  # loose files
    assert Source(make(tmp_path / "c", ["only/1.png", "only/2.png"])).labels is None  # one folder
    # a zip with one wrapping folder: the classes are one level down
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for name in ("set/dog/1.png", "set/cat/2.png"):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
    s = Source(tmp_path / "d.zip")
    assert s.files == ["set/cat/2.png", "set/dog/1.png"] and s.class_names == ["cat", "dog"] and s.labels == [0, 1]


def test_corrupt_and_tiny_images_are_skipped_and_counted(tmp_path, photo_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(photo_dir.rglob("*.jpg"))[:3]
    for i, p in enumerate(good):
        (src / f"good{i}.jpg").write_bytes(p.read_bytes())
    (src / "truncated.jpg").write_bytes(good[0].read_bytes()[:400])
    (src / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (2, 2), (9, 9, 9)).save(src / "tiny.png")
    dest = tmp_path / "out.zip"
    assert main(["prepare", "images", "--source", str(src), "--dest", str(dest), "--resolution", "16",
                 "--transform", "center-crop", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "3 images" in out and "unlabelled" in out
    assert "skipped 3: 2 unreadable, 1 too small" in out
    assert len(ImageFolderDataset(dest)) == 3
    info = prepare_images(src, tmp_path / "out2.zip", 16, "center-crop", max_images=2, progress=False)
    assert info["count"] == 2


def test_worker_processes_write_the_same_archive(tmp_path, photo_dir):
    a = prepare_images(photo_dir, tmp_path / "a.zip", 16, "center-crop", progress=False)
    b = prepare_images(photo_dir, tmp_path / "b.zip", 16, "center-crop", workers=2, progress=False)
    assert a["count"] == b["count"] and a["label_dim"] == b["label_dim"] == 3
    with zipfile.ZipFile(tmp_path / "a.zip") as za, zipfile.ZipFile(tmp_path / "b.zip") as zb:
        assert za.namelist() == zb.namelist()
        assert all(za.read(n) == zb.read(n) for n in za.namelist())


def test_interrupted_images_run_leaves_no_archive(tmp_path, photo_dir, monkeypatch):
    import imm.data.prepare as prep

    calls = []
    real = prep._process

    def flaky(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prep, "_process", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_images(photo_dir, tmp_path / "x.zip", 16, "center-crop", progress=False)
    assert os.listdir(tmp_path) == []  # neither x.zip nor its temporary file


def test_clear_errors(tmp_path, capsys, image_zip):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    cases = [
        (["images", "--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "o.zip")], "does not exist"),
        (["images", "--source", str(empty), "--dest", str(tmp_path / "o.zip")], "holds no images"),
        (["images", "--source", str(empty), "--dest", str(tmp_path / "o.zip"), "--resolution", "0"],
         "--resolution must be at least 8"),
        (["images", "--source", str(empty), "--dest", str(image_zip)], "already exists"),
        (["images", "--source", str(empty), "--dest", str(tmp_path / "o.tar")], "must end with .zip"),
        (["latents", "--source", str(tmp_path / "missing.zip"), "--dest", str(tmp_path / "l")], "does not exist"),
        (["stats", "--source", str(tmp_path / "missing.zip")], "does not exist"),
        (["stats"], "give --source"),
    ]
    for argv, message in cases:
        assert main(["prepare", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("imm prepare: error:") and message in err and "\n" not in err, (argv, err)
    # images that need a transform without one
    assert main(["prepare", "images", "--source", str(image_zip), "--dest", str(tmp_path / "p.zip"),
                 "--resolution", "32"]) == 2
    assert "pass --transform" in capsys.readouterr().err
    for cmd in ("images", "latents", "stats"):
        with pytest.raises(SystemExit) as e:
            main(["prepare", cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# imm prepare latents


def read_latents(path):
    ds = ImageFolderDataset(path)
    return np.stack([ds[i][0].numpy() for i in range(len(ds))]), ds.labels


def test_interrupted_encode_resumes_without_reencoding(tmp_path, image_zip, tiny_vae_dir):
    kw = dict(vae=str(tiny_vae_dir), batch_size=8, shard_size=10, device="cpu", progress=False)
    logs = []
    dest = tmp_path / "lat"
    first = write_latent_archive(image_zip, dest, max_shards=2, log=logs.append, **kw)
    assert first["finished"] is False and first["encoded"] == 20
    assert not (dest / "dataset.json").exists() and not stats_path_for(dest).exists()
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(dest.glob("0000[01]/*.npy"))}
    assert len(done) == 20
    (dest / ".tmp-00002-0").mkdir()  # a shard a killed run was writing: removed, then redone
    (dest / ".tmp-00002-0" / "img00000020.npy").write_bytes(b"partial")

    logs.clear()
    result = write_latent_archive(image_zip, dest, log=logs.append, **kw)
    assert any("2 already done (skipped)" in line for line in logs)
    assert result["finished"] and result["encoded"] == result["count"] - 20
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # not rewritten
    assert not list(dest.glob(".tmp-*"))

    fresh = write_latent_archive(image_zip, tmp_path / "fresh.zip", **kw)  # uninterrupted, packed into a zip
    assert not (tmp_path / "fresh.zip.work").exists()
    a, la = read_latents(dest)
    b, lb = read_latents(tmp_path / "fresh.zip")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape[1:] == (8, 8, 8) and a.dtype == np.float32
    assert fresh["raw_mean"] == pytest.approx(result["raw_mean"])

    # the exact-moment statistics agree with the stored means and stds
    mean, std = a[:, :4].astype(np.float64), a[:, 4:].astype(np.float64)
    mu = mean.mean(axis=(0, 2, 3))
    sd = np.sqrt((mean**2 + std**2).mean(axis=(0, 2, 3)) - mu**2)
    stats = json.loads(stats_path_for(dest).read_text())
    assert stats["raw_mean"] == pytest.approx(mu.tolist(), rel=1e-9) and stats["raw_std"] == pytest.approx(sd.tolist())
    assert stats["overrides"].startswith("encoder.raw_mean=[") and stats["count"] == len(a)

    # a damaged shard is named by the consistency check; other settings are refused
    os.remove(next((dest / "00001").glob("*.npy")))
    with pytest.raises(RuntimeError, match="00001"):
        write_latent_archive(image_zip, dest, **kw)
    with pytest.raises(ValueError, match="other settings"):
        write_latent_archive(image_zip, dest, **{**kw, "shard_size": 7})


def test_stats_command(tmp_path, image_zip, tiny_vae_dir, capsys):
    grid = tmp_path / "g.png"
    assert main(["prepare", "stats", "--source", str(image_zip), "--grid", str(grid), "--num-images", "9"]) == 0
    out = capsys.readouterr().out
    assert "shape:      3 x 16 x 16 (uint8)" in out and "3 classes" in out and "birds, cats, dogs" in out
    assert Image.open(grid).size == (3 * 18 + 2, 3 * 18 + 2)
    lat = tmp_path / "lat"
    write_latent_archive(image_zip, lat, vae=str(tiny_vae_dir), shard_size=1000, dtype="float16", device="cpu",
                   progress=False, log=lambda s: None)
    assert np.load(lat / "00000" / "img00000000.npy").dtype == np.float16  # read back as float32
    info = dataset_stats(lat, grid=tmp_path / "l.png", num_images=4)
    assert info["channels"] == 8 and info["dtype"] == "float32" and "no VAE" in info["grid"]["how"]
    assert main(["prepare", "stats", "--source", str(lat), "--grid", str(tmp_path / "d.png"), "--vae",
                 str(tiny_vae_dir), "--num-images", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == {"classes": 3, "min_per_class": info["labels"]["min_per_class"],
                              "max_per_class": info["labels"]["max_per_class"],
                              "mean_per_class": info["labels"]["mean_per_class"], "empty_classes": []}
    assert "decoded" in info["grid"]["how"]
    assert Image.open(tmp_path / "d.png").size == (2 * 18 + 2, 2 * 18 + 2)  # decoded back to 16 px


def test_training_and_prepare_label_a_folder_the_same_way(tmp_path):
    """One class-folder rule (imm.data.scan) for `imm train` and `imm prepare`, on the layouts where two rules
    could disagree: a shared top folder (ImageNet's train/<class>/...) and images deeper down in a class
    folder."""
    from imm.data.datasets import ImageFolderDataset
    from imm.data.prepare import Source

    rng = np.random.default_rng(0)
    layouts = {"shared-top": ["train/cat/1.png", "train/cat/2.png", "train/dog/3.png"],
               "nested": ["cat/a/1.png", "cat/2.png", "dog/b/c/3.png"],
               "edm-chunks": ["00000/img00000000.png", "00001/img00001000.png"]}
    expected = {"shared-top": ([0, 0, 1], ["cat", "dog"]), "nested": ([0, 0, 1], ["cat", "dog"]),
                "edm-chunks": (None, None)}
    for layout, names in layouts.items():
        root = tmp_path / layout
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
        source = Source(root)
        dataset = ImageFolderDataset(root)
        labels, class_names = expected[layout]
        assert (source.labels, source.class_names) == (labels, class_names), layout
        assert (None if not dataset.label_dim else dataset.labels.tolist()) == labels, layout
        assert dataset.class_names == class_names, layout


PAIRS = [["a/1.png", 1], ["a/2.png", 0], ["b/3.png", 2]]  # not the class-folder labels (0, 0, 1)
DATASET_JSON_FORMS = {  # dataset.json -> (labels, class_names, label_dim)
    "edm-pairs": ({"labels": PAIRS}, [1, 0, 2], None, 3),
    "edm-null": ({"labels": None}, None, None, 0),
    "mapping": ({"labels": dict(PAIRS)}, [1, 0, 2], None, 3),
    "backslashes": ({"labels": [[n.replace("/", "\\"), lab] for n, lab in PAIRS]}, [1, 0, 2], None, 3),
    "class-names": ({"labels": PAIRS, "class_names": ["ant", "bee", "cat", "dog"]}, [1, 0, 2],
                    ["ant", "bee", "cat", "dog"], 4),
}


@pytest.mark.parametrize("container", ["folder", "zip"])
@pytest.mark.parametrize("form", list(DATASET_JSON_FORMS))
def test_training_and_prepare_read_every_dataset_json_form(tmp_path, form, container):
    """One reader (imm.data.source) of dataset.json for `imm train` and `imm prepare images`."""
    meta, labels, class_names, label_dim = DATASET_JSON_FORMS[form]
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for name, _ in PAIRS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
    (root / "dataset.json").write_text(json.dumps(meta))
    if container == "zip":
        with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(root).as_posix())
        root = tmp_path / "src.zip"
    dataset = ImageFolderDataset(root)
    assert (None if not dataset.label_dim else dataset.labels.tolist()) == labels
    assert (dataset.class_names, dataset.label_dim) == (class_names, label_dim)
    source = Source(root)
    assert (source.labels, source.class_names, source.label_dim) == (labels, class_names, label_dim)
    info = prepare_images(root, tmp_path / "out.zip", 8, progress=False)
    assert (info["count"], info["label_dim"], info["class_names"]) == (3, label_dim, class_names)
    prepared = ImageFolderDataset(tmp_path / "out.zip")
    assert (None if not prepared.label_dim else prepared.labels.tolist()) == labels
    assert (prepared.class_names, prepared.label_dim) == (class_names, label_dim)


def test_dataset_json_class_names_must_name_every_class(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(root / "b.png")
    (root / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 2]], "class_names": ["x", "y"]}))
    for read in (ImageFolderDataset, Source):
        with pytest.raises(ValueError, match="'class_names' must be a list of names, one per class id 0..2"):
            read(root)
