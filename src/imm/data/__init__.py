"""What the trainer and the tools read: image folders, zips and archives (one reader), ``.npz``, latent
archives, the bundled MNIST digits and toy 2-D sets; the trainer's data stream; the encoders between
pixels and model space; and the dataset tools of ``imm prepare``."""
