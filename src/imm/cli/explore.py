"""``imm explore``: a local web page that samples a checkpoint as its knobs turn (:mod:`imm.interop.explore`)."""

from __future__ import annotations

from imm.cli.options import add_command, add_device, add_overrides, split_network_overrides

EXPLORE_HINT = 'pip install "imm[explore]" (Gradio)'
EXAMPLES = """examples:
  imm explore --checkpoint runs/demo/network.safetensors
  imm explore --checkpoint cifar10.pt --config cifar10 --port 8000
  imm explore --checkpoint hf://me/imm-mnist
"""


def cmd_explore(args) -> int:
    import importlib.util

    import torch

    from imm.core.errors import MissingPackageError
    from imm.interop.explore import Explorer, serve

    if importlib.util.find_spec("gradio") is None:
        raise MissingPackageError(f"imm explore needs Gradio: {EXPLORE_HINT}")
    overrides, network = split_network_overrides(args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    explorer = Explorer(args.checkpoint, args.config, overrides, network, device=device)
    serve(explorer, args.host, args.port)
    return 0


def add_parsers(sub) -> None:
    p = add_command(sub, "explore", help="a local web page that samples a checkpoint interactively",
                    description="Serve a page (Gradio) on this machine that samples CHECKPOINT with the settings "
                                "you choose: a recorded sampling entry or 1-8 steps, the middle time of a 2-step "
                                "sample, guidance and classes for a class-conditional network, seed and image "
                                "count; a second panel draws other settings from the same noise. One request "
                                "samples at a time; Ctrl-C stops the server. Needs " + EXPLORE_HINT + ".",
                    examples=EXAMPLES)
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, .safetensors, training state, released .pkl/.pt, or hf:// path")
    p.add_argument("--config", default=None,
                   help="preset or YAML for the sampling entries and encoder (default: what the checkpoint records, "
                        "else cifar10)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="the port (default: 7860)")
    add_device(p)
    add_overrides(p, "dotted config overrides, e.g. network.temb_type=identity encoder.vae_name=FOLDER")
    p.set_defaults(func=cmd_explore)
