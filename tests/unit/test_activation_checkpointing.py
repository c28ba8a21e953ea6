"""training.activation_checkpointing: DiT and UNet blocks recomputed in the backward pass, with the
gradients of the plain run, in one process (DDP/FSDP2 and torch.compile: tests/integration/)."""

import pytest
import torch

from imm import IMMNetwork
from imm.core.config import ConfigError
from imm.methods.registry import build_loss
from imm.model.backbones import set_activation_checkpointing
from imm.model.backbones.dit import DiTBlock
from imm.model.backbones.unet import UNetBlock
from imm.training.loop import train
from tests.helpers import image_cfg, npz_images, online_weights, toy_cfg

NETS = {
    "dit": (dict(img_resolution=8, img_channels=4, label_dim=3, model_type="DiT", patch_size=2, hidden_size=32,
                 depth=2, num_heads=2, dropout=0.1), DiTBlock),
    "unet": (dict(img_resolution=8, img_channels=3, label_dim=3, model_type="SongUNet", model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1), UNetBlock),
}


def _grads_and_block_calls(name: str, checkpointed: bool):
    kwargs, block_type = NETS[name]
    torch.manual_seed(0)
    net = IMMNetwork(**kwargs).train()
    assert set_activation_checkpointing(net, checkpointed) == 1
    calls = []
    for m in net.modules():
        if isinstance(m, block_type):
            m.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation may stop before the end)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, net.img_channels, 8, 8, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    torch.manual_seed(2)  # dropout
    loss, _ = build_loss({"group_size": 4, "k": 3, "mapping": "time_decrement"})(net, x, y, target_net=net, generator=gen)
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name", sorted(NETS))
def test_checkpointed_blocks_recompute_and_give_the_same_gradients(name):
    plain, plain_calls = _grads_and_block_calls(name, False)
    ckpt, ckpt_calls = _grads_and_block_calls(name, True)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], rtol=1e-6, atol=1e-6), k
    # the target pass (no grad) runs each block once, the gradient pass once more, its recomputation a third time
    assert ckpt_calls == plain_calls * 3 // 2


def test_trainer_option_trains_like_the_plain_run(tmp_path):
    npz = npz_images(tmp_path / "d.npz")
    for mode in ("false", "true"):
        train(image_cfg(npz, "training.total_steps=2", f"training.activation_checkpointing={mode}"),
              tmp_path / mode, device="cpu")
    a, ema_a, _ = online_weights(tmp_path / "false")
    b, ema_b, _ = online_weights(tmp_path / "true")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-6), k
    assert not any(torch.equal(a[k], ema_a["0.995"][k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_a_network_without_blocks_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="activation_checkpointing needs a DiT or SongUNet"):
        train(toy_cfg("training.total_steps=1", "training.activation_checkpointing=true"), tmp_path, device="cpu")
