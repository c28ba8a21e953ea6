"""Safe loading of the released pickles, torch.save files and our safetensors format."""

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

import imm
from imm.io import safe_pickle
from imm.io.checkpoint import CheckpointError, read_checkpoint
from tests.helpers import FIXTURES

DIT = FIXTURES / "dit_imagenet_like.pkl"


class _RunsCommand:
    """A pickle payload that would run a shell command when unpickled by pickle.load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalsCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("payload_cls", [_RunsCommand, _EvalsCode])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, payload_cls):
    marker = tmp_path / "pwned"
    if payload_cls is _RunsCommand:
        payload = payload_cls(f"touch {marker}")
    else:
        payload = payload_cls(f"open({str(marker)!r}, 'w').write('x')")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}))
    with pytest.raises(CheckpointError, match="refused: .*not allowed"):
        imm.load_network(path)
    assert not marker.exists()
    # the same payload inside a torch.save zip is refused too
    zpath = tmp_path / "evil.pt"
    torch.save({"ema": payload}, zpath)
    with pytest.raises(CheckpointError, match="refused"):
        imm.load_network(zpath)
    assert not marker.exists()


def test_persistent_module_source_is_never_executed(tmp_path, monkeypatch):
    """The release embeds module source in each persistent object; loading must not run it."""
    monkeypatch.chdir(tmp_path)
    original = DIT.read_bytes()
    placeholder = b"# source omitted from this test file\n"
    # Code of the same length (keeps the pickle's frames valid) that leaves a marker if executed.
    code = b"open('ran', 'w').write('x')"
    code = code + b" #" + b" " * (len(placeholder) - len(code) - 3) + b"\n"
    assert len(code) == len(placeholder) and original.count(placeholder) >= 1
    data = original.replace(placeholder, code)
    exec(compile(code, "check", "exec"), {})  # the payload does work when run ...
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    path = tmp_path / "with_source.pkl"
    path.write_bytes(data)
    net = imm.load_network(path)  # ... and loading does not run it
    assert net.label_dim == 10
    assert safe_pickle.loads(data)["ema"].name == "IMMPrecond"
    assert not (tmp_path / "ran").exists()


def test_release_packages_are_not_imported():
    """timm, omegaconf, dnnlib, torch_utils stay unimported: their classes are read as data."""
    code = (
        "import sys, imm\n"
        "for m in ('timm', 'omegaconf', 'dnnlib', 'torch_utils', 'training'): sys.modules[m] = None\n"
        f"net = imm.load_network({str(DIT)!r})\n"
        "assert net.config['model_type'] == 'DiT'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_omegaconf_and_easydict_configs_read_as_plain_data(tmp_path):
    """Nets built from hydra configs carry omegaconf containers in _init_kwargs."""
    omegaconf = pytest.importorskip("omegaconf")
    obj = safe_pickle.loads(DIT.read_bytes())
    kwargs = obj["ema"].state["_init_kwargs"]
    # Build a pickle whose _init_kwargs is a DictConfig (as hydra leaves it), then read it without omegaconf.
    cfg = omegaconf.OmegaConf.create({"hidden": 64, "mult": [1, 2], "nested": {"a": 1.5}, "name": "x"})
    blob = pickle.dumps(cfg)
    plain = safe_pickle.to_plain(safe_pickle.loads(blob))
    assert plain == {"hidden": 64, "mult": [1, 2], "nested": {"a": 1.5}, "name": "x"}
    assert isinstance(kwargs, dict)


def test_torch_save_whole_dict_and_state_dict(tmp_path):
    net = imm.load_network(DIT)
    sd_path = tmp_path / "state.pt"
    torch.save({"ema": net.state_dict()}, sd_path)
    config, tensors = read_checkpoint(sd_path)
    assert config is None and set(tensors) == set(net.state_dict())
    with pytest.raises(CheckpointError, match="no network configuration"):
        imm.load_network(sd_path)
    again = imm.load_network(sd_path, **net.config)
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # a bare backbone state_dict gets the model. prefix
    bb_path = tmp_path / "backbone.pt"
    torch.save(net.model.state_dict(), bb_path)
    assert torch.equal(imm.load_network(bb_path, **net.config).model.t_embedder.mlp[0].weight,
                       net.model.t_embedder.mlp[0].weight)
    # a whole pickled module (torch.save(net)) is read as data, config included
    mod_path = tmp_path / "module.pt"
    torch.save(net, mod_path)
    whole = imm.load_network(mod_path)
    assert whole.config == net.config


def test_safetensors_round_trip_is_exact(tmp_path):
    net = imm.load_network(DIT)
    out = tmp_path / "dit.safetensors"
    imm.convert(DIT, out)
    back = imm.load_network(out)
    assert back.config == net.config
    sd, sd2 = net.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # and the sampler gives identical outputs
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    assert torch.equal(imm.sample(net, x, labels, num_steps=2, discretization="uniform", cfg_scale=1.5),
                       imm.sample(back, x, labels, num_steps=2, discretization="uniform", cfg_scale=1.5))


def test_overrides_apply_on_top_of_the_file(tmp_path):
    net = imm.load_network(DIT, temb_type="identity")
    assert net.temb_type == "identity" and net.config["temb_type"] == "identity"
    with pytest.raises(CheckpointError, match="temb_type"):
        imm.load_network(DIT, temb_type="bogus")


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(DIT.read_bytes()[:5000]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"hello world, not a checkpoint"), "not a checkpoint"),
    (lambda p: p.write_bytes(pickle.dumps({"weights": [1, 2, 3]})), "not an IMM checkpoint"),
    (lambda p: p.write_bytes(pickle.dumps({"ema": 3})), "not an IMM checkpoint"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "bad.pkl"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        imm.load_network(path)
    assert "\n" not in str(info.value)


def test_corrupt_safetensors(tmp_path):
    out = tmp_path / "dit.safetensors"
    imm.convert(DIT, out)
    out.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        imm.load_network(out)


def test_mismatched_tensors_are_listed_by_name(tmp_path):
    net = imm.load_network(DIT)
    sd = dict(net.state_dict())
    sd.pop("model.final_layer.linear.bias")
    sd["model.extra.weight"] = torch.zeros(3)
    sd["model.x_embedder.proj.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pt"
    torch.save({"ema": sd}, path)
    with pytest.raises(CheckpointError) as info:
        imm.load_network(path, **net.config)
    msg = str(info.value)
    assert "missing: model.final_layer.linear.bias" in msg
    assert "unexpected: model.extra.weight" in msg
    assert "model.x_embedder.proj.bias [5] != [64]" in msg
    # a config that disagrees with the tensors
    with pytest.raises(CheckpointError, match="shape mismatch"):
        imm.load_network(DIT, hidden_size=32)


def test_storage_bytes_loader_is_weights_only():
    """torch.storage._load_from_bytes is replaced by a weights_only load."""
    buf = io.BytesIO()
    torch.save(_RunsCommand("true"), buf)
    with pytest.raises(Exception):
        safe_pickle._load_storage_bytes(buf.getvalue())


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """A safetensors file begins with its header length (8 bytes, little-endian): a length of 0x..80 makes
    the first byte 0x80, a pickle's first byte: it must be read as safetensors, not as a pickle."""
    import struct

    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(2)}
    for pad in range(300):
        path = tmp_path / f"pad{pad}.safetensors"
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    config, state = imm.read_checkpoint(path)
    assert config is None and torch.equal(state["w"], tensors["w"])
