"""Files of networks: the restricted unpickler, checkpoint reading, checking, saving and conversion,
``hf://`` paths on the Hugging Face Hub, and image files (PNG, grids, scatter plots)."""
