"""YAML presets and dotted overrides."""

import pytest

from imm.core.config import ConfigError, apply_overrides, dotted_items, flatten, load_config, preset_names


def test_presets_load():
    assert {"cifar10", "imagenet256"} <= set(preset_names())
    cfg = load_config("cifar10")
    assert cfg["sampling"]["2_steps"]["mid_nt"] == [1.4]
    im = load_config("imagenet256")
    assert [e["num_steps"] for e in im["sampling"].values()] == [1, 2, 4, 8]
    assert all(e["cfg_scale"] == 1.5 for e in im["sampling"].values())


def test_overrides_release_spelling():
    cfg = load_config("imagenet256")
    out = apply_overrides(cfg, ["eval.batch_size=4", "network.temb_type=identity", "+extra.key=[1, 2]",
                                "encoder.vae_name=/tmp/vae", "eval.seed=null", "+lr=3e-4", "+name=abc"])
    assert out["lr"] == 3e-4 and out["name"] == "abc"
    assert out["eval"]["batch_size"] == 4 and out["eval"]["seed"] is None
    assert out["network"]["temb_type"] == "identity"
    assert out["extra"]["key"] == [1, 2]
    assert out["encoder"]["vae_name"] == "/tmp/vae"
    assert cfg["eval"]["batch_size"] == 16  # the input is not modified


def test_unknown_key_names_the_nearest():
    cfg = load_config("cifar10")
    with pytest.raises(ConfigError, match="did you mean 'eval.batch_size'"):
        apply_overrides(cfg, ["eval.batchsize=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["eval.batch_size"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'cifar11'"):
        load_config("cifar11")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))


@pytest.mark.parametrize("model_type, typo, nearest", [
    ("SongUNet", "model_chanels", "model_channels"), ("DiT", "hiden_size", "hidden_size"),
    ("DiT_S_2", "num_head", "num_heads"), ("MLP", "hiden", "hidden")])
def test_a_network_key_typo_is_refused_for_every_backbone(model_type, typo, nearest, capsys):
    """The release's backbones ignore unknown keys (SongUNet warns), so there a typo trains another model;
    here it is one error naming the nearest key, from Python and from `imm train`."""
    import imm

    with pytest.raises(ValueError, match=rf"unknown config key 'network\.{typo}' for model_type {model_type}; did you mean 'network\.{nearest}'"):
        imm.IMMNetwork(img_resolution=8, img_channels=4, model_type=model_type, **{typo: 1})
    if model_type == "MLP":
        from imm import cli

        assert cli.main(["train", "--config", "toy2d", "--run-dir", "unused", f"network.{typo}=64"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"did you mean 'network.{nearest}'" in err[0]


def test_declared_keys_of_a_dataclass_and_of_a_constructor():
    """One rule for every section: its keys and defaults are the fields of a dataclass or a constructor's
    keyword parameters, and fill_section refuses any other key naming the nearest."""
    from imm.core.config import REQUIRED, declared_keys, fill_section
    from imm.data.datasets import NpzDataset
    from imm.training.config import TrainingSection

    keys = declared_keys(TrainingSection)
    assert keys["seed"] == 0 and keys["ema_decays"] == [0.9999]
    keys["ema_decays"].append(0.5)  # a copy: the declaration is not changed
    assert declared_keys(TrainingSection)["ema_decays"] == [0.9999]
    npz = declared_keys(NpzDataset)
    assert npz["path"] is REQUIRED and npz["layout"] is None and "self" not in npz
    assert fill_section("dataset", {"path": "x.npz"}, NpzDataset)["use_labels"] is True
    with pytest.raises(ConfigError, match=r"unknown config key 'dataset.layuot'; did you mean 'dataset.layout'"):
        fill_section("dataset", {"path": "x.npz", "layuot": "nchw"}, NpzDataset)


def test_train_config_is_resolved_once_from_its_declarations():
    from imm.training.config import load_train_config, resolve_config

    cfg = load_train_config("toy2d", ["training.seed=3", "optimizer.warmup_steps=5", "loss.kernel=rbf"])
    assert (cfg["training"]["seed"], cfg["optimizer"]["warmup_steps"], cfg["loss"]["kernel"]) == (3, 5, "rbf")
    assert cfg["training"]["batch_per_device"] is None  # a default the preset does not state
    assert resolve_config(cfg) == cfg  # resolving a resolved config changes nothing
    for bad, message in [("training.sede=1", "did you mean 'training.seed'"),
                         ("optimizer.lr=0", "optimizer.lr must be a number > 0"),
                         ("training.precision=fp8", "training.precision must be one of auto, fp32, tf32, bf16, fp16"),
                         ("training.memory_format=nhwc", "training.memory_format must be one of auto, contiguous, "
                                                         "channels_last"),
                         ("optimizer.betas=[0.9]", "optimizer.betas must be a list of 2 numbers"),
                         ("logging.sample_steps=[1, 0]", "logging.sample_steps must be a list of numbers, each a "
                                                         "positive integer"),
                         ("loss.kernal=rbf", "did you mean 'loss.kernel'"),
                         ("trainig.seed=1", "unknown config key 'trainig.seed'")]:
        with pytest.raises(ConfigError, match=message):
            load_train_config("toy2d", [bad])


def test_a_baseline_drops_the_presets_imm_keys_but_refuses_them_on_the_command_line():
    from imm.training.config import load_train_config

    for choice in ("loss.kind=flow_matching", "loss.method=flow_matching"):  # the release's key works too
        fm = load_train_config("mnist", [choice])
        assert fm["loss"] == {"kind": "flow_matching", "time_sampling": "uniform", "label_dropout": 0.0}
        with pytest.raises(ConfigError, match="loss.k applies to loss.kind=imm, not flow_matching"):
            load_train_config("mnist", [choice, "loss.k=5"])
    assert load_train_config("mnist", ["loss.k=5"])["loss"]["k"] == 5


def test_every_method_meets_the_loss_protocol():
    from imm.methods import registry as methods

    for name, method in methods.METHODS.items():
        loss = methods.build_loss({"kind": name})
        assert isinstance(loss.group_size, int) and loss.group_size >= 1, name
        loss.set_progress(0, 10)  # every loss takes it (a no-op without a schedule)
        assert isinstance(method.forward_equivalents, int) and callable(method.sample)  # counted: test_meanflow.py


def test_flatten_and_dotted_items():
    cfg = {"a": {"b": 1, "c": {"d": [2]}}, "e": {}, "f": None}
    assert flatten(cfg) == {"a.b": 1, "a.c.d": [2], "f": None}
    assert [k for k, _ in dotted_items(cfg)] == ["a", "a.b", "a.c", "a.c.d", "e", "f"]
